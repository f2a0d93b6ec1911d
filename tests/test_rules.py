"""Pure rules: qmail's domain-map and users/assign lookups, .qmail names, normalisation."""

from __future__ import annotations

import pytest

from updater.errors import SourceError
from updater.generate import classify, merge, normalise, universe
from updater.qmail import (assign_index, assign_lookup, dot_qmail_exts, fastforward_cdb, lower_ascii,
                           map_index, map_lookup, parse_assign, parse_domain_map, runs)
from updater.sources import Found, Notes
from updater.sources.aliases import fastforward_keys


def vmap(text: str):
    return parse_domain_map([(n, l) for n, l in enumerate(text.splitlines(), 1)], "vd")


def test_lower_ascii_only():
    assert lower_ascii("JoE@ExAmPlE.COM") == "joe@example.com"
    assert lower_ascii("ÄBC") == "Äbc"


def test_map_lookup_order():
    index = map_index(vmap("a.b.c:exact\n.b.c:parent\n.c:top\n:all\na.b.c:second"))
    assert map_lookup(index, "a.b.c").right == "exact"          # first line wins
    assert map_lookup(index, "x.b.c").right == "parent"
    assert map_lookup(index, "y.c").right == "top"
    assert map_lookup(index, "z.org").right == "all"
    assert map_lookup(map_index(vmap("a.org:x")), "b.org") is None


def test_parse_domain_map_errors_name_line():
    with pytest.raises(SourceError) as err:
        vmap("ok.example:x\nbroken")
    assert str(err.value) == "vd:2: malformed line (expected 'domain:value'): 'broken'"


def test_assign_lookup_exact_then_longest_prefix():
    entries = parse_assign("=joe:joe:1:1:/h/joe:::\n+a-:u:2:2:/h/a:-::\n+a-b-:u:3:3:/h/ab:-::\n"
                           ".\n+ignored-:u:4:4:/x:-::\n", "assign")
    entries = assign_index(entries)
    hit, rest = assign_lookup(entries, "joe")
    assert hit.home == "/h/joe" and rest == ""
    hit, rest = assign_lookup(entries, "a-b-c")
    assert hit.home == "/h/ab" and rest == "c"
    assert assign_lookup(entries, "ignored-x") is None
    assert assign_lookup(entries, "joe", exact=False) is None
    with pytest.raises(SourceError) as err:
        parse_assign("+a-:u:x:2:/h:-::\n", "assign")
    assert str(err.value) == "assign:1: uid is not a number: 'x'"


def test_dot_qmail_exts():
    names = [".qmail", ".qmail-", ".qmail-a", ".qmail-b:c", ".qmail-d.e", ".qmail-Up",
             ".qmail-x-default", "other", ".qmail-default"]
    assert list(dot_qmail_exts(names, ".qmail-")) == ["a", "b.c", "x-default", "default"]


def test_runs_and_fastforward_cdb():
    text = "# comment\n&joe\n| /usr/bin/fastforward -d /etc/aliases.cdb\n"
    assert runs(text, "fastforward") == ["-d", "/etc/aliases.cdb"]
    assert fastforward_cdb(["-d", "/etc/aliases.cdb"]) == "/etc/aliases.cdb"
    assert runs(text, "vdelivermail") is None


def test_fastforward_keys():
    keys = [":joe@a.example", ":x@remote.example", ":any@", ":@a.example", "?internal", "other"]
    assert fastforward_keys(keys, ["a.example", "b.example"]) == [
        "joe@a.example", "any@a.example", "any@b.example", "@a.example"]


def test_universe_and_classify():
    dom = universe([(1, "Local.Example"), (2, "virt.example"), (3, "route.example"),
                    (4, "ali.example"), (5, "exc.example")], "rh", ["more.example"], "more.cdb")
    plan = classify(dom, {"local.example"},
                    vmap("virt.example:v\nali.example:alias\nexc.example:\nu@virt.example:w"),
                    vmap("route.example:h\nmore.example:h\nexc.example:h"))
    assert plan.local == ["local.example"]
    assert plan.alias == ["ali.example"]
    assert [d for d, _ in plan.virtual] == ["virt.example"]
    assert [d for d, _ in plan.routed] == ["route.example", "exc.example", "more.example"]
    assert [e.left for e in plan.singles] == ["u@virt.example"]


def test_normalise_and_merge():
    notes = Notes()
    assert normalise(["A@B", "bad key@b", "x\n@b"], "o", notes) == [b"a@b"]
    assert notes.warnings == ["o: skipped 2 name(s) with white space or control characters"]
    result = merge([Found("one", ["a@d", "b@d", "c@e"]), Found("two", ["a@d"]),
                    Found("ex", ["b@d", "@e"], reject=True)], Notes(), "d")
    assert result.items() == [(b"@e", b"-"), (b"a", b""), (b"a@d", b""), (b"b", b"-"),
                              (b"b@d", b"-")]
    assert result.origin(b"b@d") == "ex"


def test_parse_vpasswd_lines():
    from updater.sources.vpopmail import parse_vpasswd
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
    from updater.qmail import delivery_commands
    assert delivery_commands("|/bin/vdelivermail '' bounce-no-mailbox\n&x@y\n") == \
        [["/bin/vdelivermail", "", "bounce-no-mailbox"]]
    assert delivery_commands("| preline  /bin/ezmlm-send  /d/list\n") == \
        [["preline", "/bin/ezmlm-send", "/d/list"]]
    assert delivery_commands('|x "a b" c\\ d\n') == [["x", "a b", "c d"]]
