"""Pure rules: qmail's domain-map and users/assign lookups, .qmail names, normalisation."""

from __future__ import annotations

import pytest

from updater.build.dotqmail import fastforward_cdb, runs
from updater.build.generate import classify, universe
from updater.build.localdelivery import getpw, qmail_search
from updater.build.merge import merge, normalise
from updater.build.qmail import (
    lower_ascii,
    lspawn_lookup,
    map_index,
    map_lookup,
    parse_assign,
    parse_domain_map,
    users_db,
)
from updater.build.routing import Accepts, Answer, DomainKeys, _prune, accepted
from updater.build.sources import Found, Notes
from updater.errors import SourceError


def vmap(text: str):
    return parse_domain_map([(n, l) for n, l in enumerate(text.splitlines(), 1)], "vd")


def test_lower_ascii_only():
    assert lower_ascii("JoE@ExAmPlE.COM") == "joe@example.com"
    assert lower_ascii("ÄBC") == "Äbc"


def test_map_lookup_order():
    index = map_index(vmap("a.b.c:first\n.b.c:parent\n.c:top\n:all\na.b.c:exact"))
    assert map_lookup(index, "a.b.c").right == "exact"      # the last line wins (constmap)
    assert map_lookup(index, "x.b.c").right == "parent"
    assert map_lookup(index, "y.c").right == "top"
    assert map_lookup(index, "z.org").right == "all"
    assert map_lookup(map_index(vmap("a.org:x")), "b.org") is None


def test_parse_domain_map_errors_name_line():
    with pytest.raises(SourceError) as err:
        vmap("ok.example:x\nbroken")
    assert str(err.value) == "vd:2: malformed line (expected 'domain:value'): 'broken'"


def test_lspawn_lookup_exact_then_longest_recorded_prefix():
    entries = parse_assign("=joe:joe:1:1:/h/joe:::\n+a-:u:2:2:/h/a:-::\n+a-b-:u:3:3:/h/ab:-::\n"
                           "+Up-X:u:5:5:/h/up:-::\n.\n+ignored-:u:4:4:/x:-::\n", "assign")
    db = users_db(entries, "assign")
    hit, rest = lspawn_lookup(db, "joe")
    assert hit.home == "/h/joe" and rest == ""
    hit, rest = lspawn_lookup(db, "a-b-c")
    assert hit.home == "/h/ab" and rest == "c"
    assert lspawn_lookup(db, "ignored-x") is None
    assert lspawn_lookup(db, "joe-x") is None          # "=" entries match exactly
    # qmail-newu records the prefix's last character as written ("X"); qmail-lspawn
    # looks for the lowercased one, so this prefix is never tried
    assert db.prefix["up-x"].home == "/h/up" and lspawn_lookup(db, "up-xyz") is None
    empty = users_db(parse_assign("+:alias:7:7:/h/alias:-::\n", "assign"), "assign")
    hit, rest = lspawn_lookup(empty, "anything-At-all")
    assert hit.home == "/h/alias" and rest == "anything-At-all"
    with pytest.raises(SourceError) as err:
        parse_assign("+a-:u:x:2:/h:-::\n", "assign")
    assert str(err.value) == "assign:1: uid is not a number: 'x'"


def test_getpw_cuts_back_at_dashes_to_an_account():
    accounts = {"joe", "joe-virt", "a" * 31, "b" * 32}
    ok = accounts.__contains__
    assert getpw("joe", ok) == ("joe", "", "")
    assert getpw("joe-virt-sales-x", ok) == ("joe-virt", "-", "sales-x")
    assert getpw("joe-other", ok) == ("joe", "-", "other")
    assert getpw("joe-", ok) == ("joe", "-", "")
    assert getpw("joex", ok) is None
    assert getpw("a" * 31 + "-x", ok) == ("a" * 31, "-", "x")
    assert getpw("b" * 32, ok) is None                 # 32 bytes: too long for qmail-getpw
    assert getpw("", ok) is None


def test_qmail_search_exact_then_default_chain():
    names = frozenset([".qmail", ".qmail-a", ".qmail-b:c", ".qmail-x-default", ".qmail-default",
                       ".qmaildefault"])
    assert qmail_search("-", "a", names) == (".qmail-a", None)
    assert qmail_search("-", "B.C", names) == (".qmail-b:c", None)
    assert qmail_search("-", "x-y-z", names) == (".qmail-x-default", 2)
    assert qmail_search("-", "x-", names) == (".qmail-x-default", 2)
    assert qmail_search("-", "x", names) == (".qmail-default", 0)
    assert qmail_search("-", "default", names) == (".qmail-default", 0)
    assert qmail_search("", "", names) == (".qmail", None)
    assert qmail_search("", "", frozenset([".qmaildefault"])) == (".qmaildefault", 0)
    assert qmail_search("-", "q", frozenset([".qmail-a"])) is None


def test_runs_and_fastforward_cdb():
    text = "# comment\n&joe\n| /usr/bin/fastforward -d /etc/aliases.cdb\n"
    assert runs(text, "fastforward") == ["-d", "/etc/aliases.cdb"]
    assert fastforward_cdb(["-d", "/etc/aliases.cdb"]) == "/etc/aliases.cdb"
    assert runs(text, "vdelivermail") is None


def test_accepted_names_and_qmail_ext():
    acc = Accepts("o", [("o", ["ann", "bob-x"])], {"ann", "bob-x"}.__contains__)
    assert accepted(acc, "ann") and not accepted(acc, "ann-y") and accepted(acc, "bob-x")
    ext = acc._replace(ext=True)
    assert accepted(ext, "ann-y-z") and accepted(ext, "bob-x-1") and not accepted(ext, "bob-y")
    assert accepted(acc._replace(everything=True), "anyone")


def test_prune_keeps_only_keys_that_change_the_answer():
    yes, no = Answer(True, "f"), Answer(False, "bounce")
    keys = DomainKeys(exact={"a": yes, "b": no, "c-x": no, "d-y": yes, "d-z": no},
                      prefix={"": no, "c-": yes, "d-": yes, "e-": no, "c-q-": yes})
    _prune(keys)
    assert keys.prefix == {"c-": yes, "d-": yes}
    assert keys.exact == {"a": yes, "c-x": no, "d-z": no}
    everything = DomainKeys(exact={"a": yes, "b": no}, prefix={"": yes, "b-": yes})
    _prune(everything)
    assert everything.prefix == {"": yes} and everything.exact == {"b": no}


def test_universe_and_classify():
    dom = universe([(1, "Local.Example"), (2, "virt.example"), (3, "route.example"),
                    (4, "ali.example"), (5, "exc.example")], "rh", ["more.example"], "more.cdb")
    plan = classify(dom, {"local.example"},
                    vmap("virt.example:v\nali.example:alias\nexc.example:\nu@virt.example:w"),
                    vmap("route.example:h\nmore.example:h\nexc.example:h"))
    assert plan.local == ["local.example"]
    assert [d for d, _ in plan.virtual] == ["virt.example", "ali.example"]
    assert [d for d, _ in plan.routed] == ["route.example", "exc.example", "more.example"]
    assert [e.left for e in plan.singles] == ["u@virt.example"]


def test_normalise_and_merge():
    notes = Notes()
    assert normalise(["A@B", "bad key@b", "x\n@b"], "o", notes) == [b"a@b"]
    assert notes.warnings == ["o: skipped 2 name(s) with white space or control characters"]
    result = merge([Found("one", ["a@d", "b@d", "c@e"]), Found("two", ["a@d"]),
                    Found("ex", ["b@d", "@e"], reject=True),
                    Found("bounce", ["a@d", "n-default@d"], deny=True)], Notes(), "d")
    assert result.items() == [(b"@e", b"-"), (b"a", b""), (b"a@d", b""), (b"b", b"-"),
                              (b"b@d", b"-"), (b"n-default", b"-"), (b"n-default@d", b"-")]
    assert result.origin(b"b@d") == "ex" and result.origin(b"a@d") == "two"


def test_parse_vpasswd_lines():
    from updater.build.sources.vpopmail import parse_vpasswd
    assert parse_vpasswd(b"", "vp") == []
    assert parse_vpasswd(b"Joe:x:1:0:J:/d/joe:NOQUOTA\nann:x:1:0::/d/ann:0", "vp") == \
        [b"joe", b"ann"]
    assert parse_vpasswd(b"\n# old users\njoe:x:1:0::/d:0\n\n", "vp") == [b"joe"]
    with pytest.raises(SourceError) as err:
        parse_vpasswd(b"joe:x:1:0::/d:0\n:x:1:0::/d:0\n", "vp")
    assert str(err.value) == "vp:2: expected 'name:pass:uid:gid:gecos:dir:quota': ':x:1:0::/d:0'"
    with pytest.raises(SourceError) as err:
        parse_vpasswd(b"joe:x:1:0::/d:0\nbroken\n", "vp")
    assert str(err.value).startswith("vp:2: expected")


def test_delivery_commands_split_like_a_shell():
    from updater.build.dotqmail import delivery_commands
    assert delivery_commands("|/bin/vdelivermail '' bounce-no-mailbox\n&x@y\n") == \
        [["/bin/vdelivermail", "", "bounce-no-mailbox"]]
    assert delivery_commands("| preline  /bin/ezmlm-send  /d/list\n") == \
        [["preline", "/bin/ezmlm-send", "/d/list"]]
    assert delivery_commands('|x "a b" c\\ d\n') == [["x", "a b", "c d"]]
