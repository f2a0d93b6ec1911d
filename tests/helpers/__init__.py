"""Helpers shared by the tests (conftest.py holds the fixtures only; no test file
imports another test file)."""
