"""The rebuild daemon's timing rules (``updater.daemon.rules``), on a fake clock: typed
events in, actions out, no sleeping, no threads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from updater.daemon.events import (
    Build,
    BuildDone,
    BuildOutcome,
    CheckFiles,
    CheckLive,
    Exit,
    FifoRead,
    FileChanged,
    FilesChecked,
    HeldUntil,
    LiveSeen,
    Log,
    Publish,
    Requested,
    Rewatch,
    Rewatched,
    StatusNews,
    StatusWritten,
    Stop,
    Targeted,
    Tick,
    Timing,
    WriteStatus,
)
from updater.daemon.rules import Scheduler
from updater.install.outcome import InstallReport
from updater.limits import LIVE_CHECK
from updater.retry import backoff

WALL = 1_700_000_000.0            # the epoch time at monotonic 0 of these tests


def make(**timing: float) -> Scheduler:
    return Scheduler(timing_with(**timing))


def timing_with(**changes: float) -> Timing:
    """The shipped defaults (config.Settings) with some rules changed."""
    import dataclasses

    from updater.config import Settings
    return dataclasses.replace(Timing.of(Settings()), **changes)


def at(s: Scheduler, now: float, event) -> list:
    return s.handle(event, now, WALL + now)


def builds(actions: list) -> list[Build]:
    return [a for a in actions if isinstance(a, Build)]


def done(s: Scheduler, started: float, ended: float, build: Build,
         status: str = "installed", error: str | None = None) -> list:
    report = None if error else InstallReport("/x/validrcptto.cdb", status, 10, [b"a@b"])
    redone = None if build.domains is None else build.domains
    outcome = BuildOutcome(started, ended, WALL + started, report, error, redone)
    return at(s, ended, BuildDone(outcome))


def first_build(s: Scheduler, t: float = 0.0, took: float = 1.0) -> None:
    (start,) = s.start()
    done(s, t, t + took, start)


def test_full_requests_are_debounced():
    s = make(quiet=2, max_delay=30, floor=30)
    assert s.full_due() is None
    at(s, 100, Requested("a"))
    assert s.full_due() == 102
    at(s, 101, Requested("b"))
    assert s.full_due() == 103
    for t in range(102, 140):
        at(s, t, Requested("c"))
    assert s.full_due() == 130                 # the maximum delay caps a steady stream
    assert builds(at(s, 129.9, Tick())) == []
    (b,) = builds(at(s, 130, Tick()))
    assert b.domains is None and b.why == "a; b; c (+17 more)"
    assert s.full_due() is None and s.waiting == 0
    at(s, 200, Requested("now", immediate=True))
    assert s.full_due() == 200


def test_fifo_requests_wait_for_the_floor_others_do_not():
    s = make(quiet=2, max_delay=30, floor=30)
    first_build(s, 90, 1)                       # the floor counts from a build's start
    at(s, 100, Requested("fifo: a", fifo=True))
    assert s.full_due() == 120 and s.held() == 120
    at(s, 101, Requested("modified vpasswd"))
    assert s.full_due() == 103 and s.held() is None
    (b,) = builds(at(s, 103, Tick()))
    done(s, 103, 104, b)
    at(s, 110, Requested("fifo: b", fifo=True))
    assert s.full_due() == 133


def test_held_build_is_logged_once_and_shown_in_the_status():
    s = make(quiet=2, max_delay=30, floor=30)
    first_build(s, 0, 1)
    acts = at(s, 5, Requested("fifo: a", fifo=True))
    (held,) = [a for a in acts if isinstance(a, (Log, HeldUntil))]
    assert held == HeldUntil(WALL + 30, 30, "fifo: a")       # the driver words the clock
    (w,) = [a for a in acts if isinstance(a, WriteStatus)]   # held: written at once
    assert w.record.pending == 1 and w.record.held_until == WALL + 30
    acts = at(s, 5.5, Requested("fifo: b", fifo=True))
    assert not [a for a in acts if isinstance(a, (Log, HeldUntil))]   # logged once
    assert not [a for a in acts if isinstance(a, WriteStatus)]  # at most one write a second
    assert s.status_due == 6.0
    (w,) = [a for a in at(s, 6.0, Tick()) if isinstance(a, WriteStatus)]
    assert w.record.pending == 2


def test_targeted_requests():
    s = make(quiet=2, max_delay=30, floor=30, fast_quiet=0.05, fast_max_delay=1,
             fast_floor=1)
    at(s, 100, Targeted("add_user a@x", frozenset({"x"}), fast=True))
    assert s.targeted_due() == pytest.approx(100.05)
    for i in range(50):                              # a burst: at most fast_max_delay
        at(s, 100 + i * 0.03, Targeted("add_user", frozenset({f"d{i}"}), fast=True))
    assert s.targeted_due() == pytest.approx(101)
    first_build(s, 80, 1)
    at(s, 100.2, Requested("fifo: burst", fifo=True))   # a full request held by the floor
    assert s.full_due() == 110
    (b,) = builds(at(s, 101, Tick()))                   # ... does not hold the targeted one
    assert b.domains is not None and len(b.domains) == 51 and s.full_due() == 110
    assert s.waiting == 1                                # what status shows: the held one
    done(s, 101, 104, b)
    # the next incremental build waits fast_floor, or half the last one's duration
    at(s, 104.1, Targeted("add_user b@x", frozenset({"x"}), fast=True))
    assert s.targeted_due() == pytest.approx(105.5)


def test_removals_wait_the_quiet_period_and_watched_files_settle():
    s = make(quiet=2, max_delay=30, floor=30, fast_quiet=0.05, fast_max_delay=1,
             fast_floor=1)
    first_build(s, 0, 1)
    at(s, 200, Targeted("del_user a@x", frozenset({"x"}), fast=False))
    at(s, 200.5, FileChanged("moved .../y/vpasswd", "/v/y/vpasswd", frozenset({"y"})))
    assert s.targeted_due() == 202.5
    at(s, 201, Targeted("add_user b@z", frozenset({"z"}), fast=True))
    (b,) = builds(at(s, 201.1, Tick()))
    assert b.domains == {"z"} and b.why == "del_user a@x; moved .../y/vpasswd; add_user b@z"
    done(s, 201.1, 201.2, Build(b.why, frozenset({"x", "y", "z"})))
    # the watched change is answered by that build (it started later), the removal is not
    assert s.pending.slow_domains.keys() == {"x"}


def test_watched_files_only_are_checked_before_a_build():
    s = make(quiet=2, max_delay=30)
    first_build(s, 0, 1)
    at(s, 10, FileChanged("modified /v/y/.qmail-a", "/v/y/.qmail-a", frozenset({"y"})))
    acts = at(s, 12, Tick())
    (check,) = [a for a in acts if isinstance(a, CheckFiles)]
    assert check.domains == {"y"} and not builds(acts)
    assert not builds(at(s, 12, FilesChecked(check.domains, changed=False)))
    assert s.waiting == 0 and s.targeted_due() is None
    at(s, 20, FileChanged("modified /v/y/.qmail-a", "/v/y/.qmail-a", frozenset({"y"})))
    at(s, 22, Tick())
    (b,) = builds(at(s, 22, FilesChecked(frozenset({"y"}), changed=True)))
    assert b.domains == {"y"}
    # a global file's change (no domains): a full build after the quiet period
    at(s, 30, FileChanged("modified /q/control/locals", "/q/control/locals"))
    (b,) = builds(at(s, 32, Tick()))
    assert b.domains is None


def test_failures_are_retried_with_backoff_and_success_clears():
    s = make(retry_min=10, retry_max=600, interval=0)
    (start,) = s.start()
    acts = done(s, 0, 1, start, error="cannot read control/locals")
    lines = [a.line for a in acts if isinstance(a, Log)]
    assert lines == ["build failed (start): cannot read control/locals; live cdb kept; "
                     "retry in 10s"]
    (w,) = [a for a in acts if isinstance(a, WriteStatus)]
    assert w.record.result == "failed" and w.record.failures == 1
    assert s.retry_at == 11
    assert [backoff(n, 10, 600) for n in (1, 2, 3, 7, 8)] == [10, 20, 40, 600, 600]
    (b,) = builds(at(s, 11, Tick()))
    assert b.why == "retry 1"
    done(s, 11, 12, b, error="again")
    assert s.retry_at == 32                             # 20 s after it ended
    (b,) = builds(at(s, 32, Tick()))
    acts = done(s, 32, 33, b)
    assert s.retry_at is None and s.failures == 0
    (w,) = [a for a in acts if isinstance(a, WriteStatus)]
    assert w.record.result == "installed" and w.record.last_success == WALL + 32
    assert s.next_deadline() == s.live_due             # nothing else is due


def test_safety_net_counts_from_the_last_full_build():
    s = make(interval=3600, fast_floor=0.5)
    first_build(s, 0, 2)
    assert s.safety_due() == 3602
    at(s, 100, Targeted("add_user a@x", frozenset({"x"}), fast=True))
    (b,) = builds(at(s, 100.05, Tick()))
    done(s, 100.05, 100.2, b)                           # incremental: not counted
    assert s.safety_due() == 3602
    (b,) = builds(at(s, 3602, Tick()))
    assert b.why == "safety net" and b.domains is None
    assert make(interval=0).safety_due() is None


def test_publish_status_and_rewatch_after_builds():
    s = make()
    (start,) = s.start()
    acts = done(s, 0, 1, start, status="unchanged")
    kinds = [type(a) for a in acts]
    # the first list goes out even unchanged; the status is written before the log lines
    assert kinds == [Publish, WriteStatus, Log, Log, Rewatch]
    assert acts[2].line == "build (start): unchanged /x/validrcptto.cdb: 10 entries, 0.00s"
    at(s, 5, Requested("signal SIGHUP", immediate=True))
    (b,) = builds(at(s, 5, Tick()))
    assert Publish not in [type(a) for a in done(s, 5, 6, b, status="unchanged")]
    at(s, 7, Targeted("add_user a@x", frozenset({"x"}), fast=True))
    (b,) = builds(at(s, 7.05, Tick()))
    acts = done(s, 7.05, 7.1, b)
    assert Publish in [type(a) for a in acts] and Rewatch not in [type(a) for a in acts]
    assert "[incremental: 1 domain: x]" in [a for a in acts if isinstance(a, Log)][0].line
    (w,) = [a for a in at(s, 8, StatusNews()) if isinstance(a, WriteStatus)]
    assert w.record.incremental_builds == 1 and w.record.builds == 3


def test_live_checks_and_stop():
    s = make()
    first_build(s, 0, 1)
    assert CheckLive() in at(s, 1, Tick())
    assert s.live_due == 1 + LIVE_CHECK
    assert CheckLive() not in at(s, 1.1, Tick())
    assert at(s, 2, Stop()) == [Exit()] and s.stopping


events = st.lists(st.tuples(
    st.floats(0, 5), st.sampled_from(["full", "fifo", "now", "fast", "slow", "file"]),
    st.sampled_from(["a", "b", "c"])), max_size=30)


@settings(max_examples=200, deadline=None)
@given(events, st.floats(0.01, 3))
def test_every_request_is_built_in_bounded_time(evs, took):
    """Liveness, on any stream of requests: driven by its own deadlines, the scheduler
    builds every request's domain (or everything) no later than the longest wait its
    rules allow, and never starts an incremental build inside the floor after one."""
    WORST[0] = 0.0
    t = timing_with(quiet=2, max_delay=30, floor=30, fast_quiet=0.05, fast_max_delay=1,
                    fast_floor=0.5, interval=0)
    s = Scheduler(t)
    first_build(s, 0, took)
    now = took
    asked: list[tuple[float, str | None]] = []
    for gap, kind, domain in evs:
        now += gap
        d = frozenset({domain})
        if kind == "fifo":                  # what the FIFO thread hands over, raw
            ev = FifoRead(b"some line\n")
            asked.append((now, None))
        elif kind in ("full", "now"):
            ev = Requested(kind, immediate=kind == "now")
            asked.append((now, None))
        elif kind == "file":
            ev = FileChanged("file", "/" + domain, d)
            asked.append((now, domain))
        else:
            ev = Targeted(kind, d, fast=kind == "fast")
            asked.append((now, domain))
        serve(s, at(s, now, ev), now, took, asked)
        now = drain(s, now, until=now, took=took, asked=asked)
    now = drain(s, now, until=None, took=took, asked=asked)
    assert not asked and s.waiting == 0
    bound = max(t.max_delay, t.floor) + 2 * took + t.quiet + 1
    assert WORST[0] <= bound


WORST = [0.0]                # the longest wait from a request to the build that took it


def serve(s: Scheduler, actions: list, now: float, took: float, asked: list) -> float:
    for a in actions:
        if isinstance(a, CheckFiles):
            return serve(s, at(s, now, FilesChecked(a.domains, changed=True)), now, took,
                         asked)
        if isinstance(a, Build):
            if a.domains is not None and s.last_end is not None:
                assert now >= s.last_end + 0.5 - 1e-9     # the incremental floor
            for i, (when, domain) in reversed(list(enumerate(asked))):
                if when <= now and (a.domains is None or domain in a.domains):
                    WORST[0] = max(WORST[0], now - when)
                    del asked[i]
            return serve(s, done(s, now, now + took, a), now + took, took, asked)
    return now


def drain(s: Scheduler, now: float, until: float | None, took: float, asked: list) -> float:
    for _ in range(1000):
        due = s.next_deadline()
        if due is None or (until is not None and due > until):
            return now
        if s.waiting == 0 and s.retry_at is None and due == s.live_due and until is None:
            return now
        now = max(now, due)
        now = serve(s, at(s, now, Tick()), now, took, asked)
    raise AssertionError("the scheduler never settles")


def test_directory_polls_start_after_a_full_build_and_back_off_on_failure():
    from updater.daemon.events import DirectoryPolled, PollDirectory
    s = make(directory_poll=10, directory_full=600)
    assert s.poll.due is None                          # nothing read yet: no poll
    first_build(s, 0, 1)
    assert s.poll.due == 11 and s.next_deadline() == s.live_due
    assert PollDirectory(False) in at(s, 11, Tick())
    assert s.poll.due is None                          # one poll at a time
    assert at(s, 12, DirectoryPolled(frozenset())) == [] and s.poll.due == 22
    # what changed is built at once (it has happened), not after the quiet period
    at(s, 22, Tick())
    acts = at(s, 22.5, DirectoryPolled(frozenset({"corp.example"})))
    assert s.targeted_due() == pytest.approx(22.55)
    (b,) = builds(at(s, 22.55, Tick()))
    assert b.domains == {"corp.example"} and b.why == "directory changed: corp.example"
    done(s, 22.55, 22.7, b)
    # a failing directory: one line, then a poll every 10, 20, 40 ... s up to 300
    at(s, 32.5, Tick())
    acts = at(s, 33, DirectoryPolled(frozenset(), "ldap ldap://x: connect failed: refused"))
    assert [a.line for a in acts if isinstance(a, Log)] == [
        "directory poll failed: ldap ldap://x: connect failed: refused; list kept; retry in 10s"]
    at(s, 43, Tick())
    assert not at(s, 44, DirectoryPolled(frozenset(), "again"))     # logged once
    assert s.poll.due == 44 + 20
    at(s, 64, Tick())
    acts = at(s, 65, DirectoryPolled(frozenset()))
    assert [a.line for a in acts if isinstance(a, Log)] == [
        "directory poll works again after 2 failure(s)"]
    # the full read (deletions) comes every directory_full seconds
    at(s, 600.5, Tick())
    s.poll.due = 601.5
    assert PollDirectory(True) in at(s, 601.5, Tick())
    assert make().poll.due is None and timing_with().directory_poll == 0  # no LDAP: off


def test_a_domain_whose_source_fails_is_retried_alone_and_never_pushed_back():
    """A build that holds a domain because its source failed: that domain is built
    again on its own after the backoff; other builds meanwhile never move the retry;
    one line when the hold starts, one when it ends; the status lists it."""
    from updater.install.liverecord import Held
    s = make(retry_min=10, retry_max=300)
    first_build(s)
    held = {"broken.example": Held("vpasswd:3: bad line", WALL, True)}

    def build_done(t: float, build: Build, holds: dict) -> list:
        report = InstallReport("/x/validrcptto.cdb", "installed", 10, held=holds)
        outcome = BuildOutcome(t, t + 1, WALL + t, report, None, build.domains)
        return at(s, t + 1, BuildDone(outcome))
    out = build_done(100, Build("x", frozenset({"broken.example"})), held)
    assert [a.line for a in out if isinstance(a, Log)][1].startswith(
        "held broken.example (its source fails")
    assert s.status.held["broken.example"].failed is True
    assert s.held_retry_at == 101 + backoff(1, 10, 300)
    build_done(105, Build("y", frozenset({"other.example"})), held)   # another domain's
    assert s.held_retry_at == 101 + backoff(1, 10, 300)                # not pushed back
    (retry,) = builds(at(s, s.held_retry_at, Tick()))
    assert retry.domains == frozenset({"broken.example"}) and "held domain retry 1" in retry.why
    out = build_done(120, retry, {})
    assert "broken.example: no longer held" in [a.line for a in out if isinstance(a, Log)]
    assert s.held_retry_at is None and s.status.held == {}


# ---- what used to be counted after a sleep against the real daemon, on the fake clock

def run_builds(s: Scheduler, now: float, until: float, took: float,
               during: list[tuple[float, object]]) -> list[Build]:
    """Drive the rules as the driver does up to ``until``: tick at each deadline, each
    build taking ``took`` seconds; the ``during`` events (time, event) are handed over
    when they come, or, when they come while a build runs, once it is done (they wait
    in the queue while the main thread builds)."""
    made: list[Build] = []
    queue = sorted(during, key=lambda x: x[0])
    while True:
        due = s.next_deadline()
        if queue and (due is None or queue[0][0] <= due):
            when, event = queue.pop(0)
            now = max(now, when)
            acts = at(s, now, event)
        elif due is not None and due <= until:
            now = max(now, due)
            acts = at(s, now, Tick())
        else:
            return made
        now = serve_builds(s, acts, now, took, made)


def serve_builds(s: Scheduler, acts: list, now: float, took: float, made: list) -> float:
    for a in acts:
        if isinstance(a, CheckFiles):
            return serve_builds(s, at(s, now, FilesChecked(a.domains, True)), now, took, made)
        if isinstance(a, Build):
            made.append(a)
            return serve_builds(s, done(s, now, now + took, a), now + took, took, made)
    return now


def test_a_thousand_fifo_lines_in_a_second_make_one_build():
    """1000 trigger lines within a second (each its own read of the FIFO): one build,
    whose reasons name the first lines and a count."""
    s = make()
    first_build(s, 0, 1)
    burst = [(100 + i * 0.001, FifoRead(b"burst %d\n" % i)) for i in range(1000)]
    made = run_builds(s, 100, 400, 0.5, burst)
    assert len(made) == 1 and made[0].domains is None
    assert made[0].why == "fifo: burst 0; fifo: burst 1; fifo: burst 2 (+17 more)"
    assert s.waiting == 0


def test_requests_during_a_build_make_exactly_one_more():
    """A trigger starts a build that takes 5 s; five more triggers while it runs make
    exactly one more build, after it, once the FIFO floor allows."""
    s = make(quiet=0.3, floor=30)
    first_build(s, 0, 1)
    during = [(100, FifoRead(b"first\n"))] + \
        [(101 + i * 0.2, FifoRead(b"during %d\n" % i)) for i in range(5)]
    made = run_builds(s, 100, 400, 5, during)
    assert [b.why for b in made] == [
        "fifo: first", "fifo: during 0; fifo: during 1; fifo: during 2 (+2 more)"]


def test_fifo_reads_become_requests():
    """One read of the FIFO: an onchange line naming its domain is a targeted request
    (with the address for a database source and the gate), any other line a full-build
    request through the FIFO; a read a burst cut short still asks for a full build."""
    s = make(fast_quiet=0.05, fast_max_delay=1)
    first_build(s, 0, 1)
    at(s, 10, FifoRead(b"add_user ann@x.example\n"))
    (b,) = builds(at(s, 10.1, Tick()))
    assert b.domains == {"x.example"} and b.rows == {"x.example": {"ann@x.example"}}
    assert b.why == "fifo: add_user ann@x.example"
    s = make()
    at(s, 10, FifoRead(b"-tail of a line\nadd_user ann@x.example\n", dropped=4096))
    assert s.pending.only_fifo and s.pending.full_reasons[0].startswith(
        "fifo: a burst of lines, some not read (4096 bytes)")
    assert s.pending.fast_domains == {"x.example"}
    s = make(incremental=False)                   # targets mean nothing: a full build
    at(s, 10, FifoRead(b"add_user ann@x.example\n"))
    assert s.pending.full_count == 1 and not s.pending.fast_domains


def test_an_incremental_build_that_cannot_be_done_is_followed_by_a_full_one():
    s = make(fast_quiet=0.05, fast_max_delay=1)
    first_build(s, 0, 1)
    at(s, 10, Targeted("add_user a@x", frozenset({"x"}), True, frozenset({"a@x"})))
    (b,) = builds(at(s, 10.1, Tick()))
    acts = at(s, 10.2, BuildDone(BuildOutcome(10.1, 10.2, WALL + 10, refused="no snapshot")))
    assert [a.line for a in acts if isinstance(a, Log)] == [
        "incremental build not possible (no snapshot): full build"]
    (full,) = builds(acts)
    assert full.domains is None and full.why == b.why and full.named == {"x": {"a@x"}}
    assert s.builds == 1                          # the refused one is no build
    done(s, 10.2, 11, full)
    assert s.builds == 2 and s.pending.named == {} and s.pending.rows == {}


def test_a_live_cdb_replaced_by_hand_is_built_again_at_once():
    s = make()
    (start,) = s.start()
    left = ((1, 2, 3, 4, 5), (1, 3, 3, 4, 5))
    at(s, 1, BuildDone(BuildOutcome(0, 1, WALL, InstallReport("/x", "installed", 1),
                                    live=left)))
    assert at(s, 2, LiveSeen(left)) == []
    at(s, 3, LiveSeen((None, left[1])))
    assert s.pending.immediate and s.pending.full_reasons == ["the live cdb was deleted"]
    (b,) = builds(at(s, 3, Tick()))
    assert b.why == "the live cdb was deleted"
    at(s, 4, LiveSeen((None, (9, 9, 9, 9, 9))))   # asked once per change seen
    assert s.pending.full_reasons == ["its .sources file was replaced"]


def test_what_changed_while_the_build_read_it_is_asked_at_once():
    s = make()
    (start,) = s.start()
    acts = done(s, 0, 1, start)
    assert Rewatch(fresh=True) in acts
    assert at(s, 2, Rewatched(frozenset())) == []
    at(s, 2, Rewatched(frozenset({"a", "b", "c", "d"})))
    assert s.pending.slow_domains.keys() == {"a", "b", "c", "d"}
    assert s.pending.targeted_reasons == ["changed since the build read it: a, b, c, ..."]
    assert s.pending.rows == {d: None for d in "abcd"}     # each read again whole
    assert Rewatch(fresh=False) in done(s, 3, 4, Build("x"), error="boom")


def test_a_status_file_that_cannot_be_written_is_logged_once():
    s = make()
    assert at(s, 1, StatusWritten("No space left on device")) == [
        Log("cannot write the status file: No space left on device")]
    assert at(s, 2, StatusWritten("No space left on device")) == []
    assert at(s, 3, StatusWritten()) == [Log("the status file is written again")]
    assert at(s, 4, StatusWritten()) == []
