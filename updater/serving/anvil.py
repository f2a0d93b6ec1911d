"""The connection limits of the --listen server (Postfix's anvil): sessions in all and
per client address, and the addresses held back for harvesting recipients, shared by
the worker processes."""

from __future__ import annotations

from typing import Any

from ..smtp.replies import R_TOOMANY  # (a held-back harvester gets the patch's words)

R_BUSY = b"421 too many connections, try again later (#4.3.2)\r\n"
R_BUSY_IP = b"421 too many connections from your address, try again later (#4.3.2)\r\n"


class Limits:
    """Connections in all and per client address, across the worker processes.

    Each worker counts its own sessions in its own row of shared memory (a total and
    a table of per-address counters; addresses are hashed into slots, so a collision
    can only make the per-address limit stricter).  A worker reads every row to
    decide and writes only its own, so there is no lock for a dying worker to hold;
    the supervisor zeroes the row of a worker that died before it starts the next
    one.  Two workers deciding at the same instant may each admit one more: the
    limits can be passed by at most (workers - 1) for a moment."""
    SLOTS = 4096

    def __init__(self, total: int, per_ip: int, workers: int,
                 harvest: tuple[int, float] = (0, 0.0)):
        self.total, self.per_ip, self.workers = total, per_ip, workers
        self.harvest = Harvest(*harvest, workers) if harvest[0] > 0 else None
        if workers > 1:
            import multiprocessing
            self.counts = multiprocessing.RawArray("i", workers)
            self.slots = multiprocessing.RawArray("i", workers * self.SLOTS)
        else:
            self.counts = [0]
            self.slots = [0] * self.SLOTS
        self.row = 0

    def slot(self, ip: str) -> int:
        import zlib
        return zlib.crc32(ip.encode()) % self.SLOTS

    def take(self, ip: str, relay: bool = False, now: float = 0.0
             ) -> tuple[bytes | None, str]:
        """(None, "") when the connection may go on (it is counted), else the reply that
        refuses it and why (busy, per_ip, harvest: the address is held back; never a
        ``relay`` client's)."""
        if self.harvest is not None and not relay and self.harvest.held(ip, now):
            return R_TOOMANY, "harvest"
        if sum(self.counts) >= self.total:
            return R_BUSY, "busy"
        slot = self.slot(ip)
        if self.per_ip and sum(self.slots[r * self.SLOTS + slot]
                               for r in range(self.workers)) >= self.per_ip:
            return R_BUSY_IP, "per_ip"
        self.counts[self.row] += 1
        self.slots[self.row * self.SLOTS + slot] += 1
        return None, ""

    def refused(self, ip: str, n: int, now: float) -> str | None:
        """``n`` recipients refused to ``ip`` in a session that ended: the line to log
        when this holds the address back."""
        h = self.harvest
        if h is None or not n or not h.refused(ip, n, now):
            return None
        return (f"holding back {ip}: {h.limit} or more recipients refused within "
                f"{h.window:g}s: 421 until that has passed")

    def give(self, ip: str) -> None:
        self.counts[self.row] -= 1
        self.slots[self.row * self.SLOTS + self.slot(ip)] -= 1

    def clear(self, row: int) -> None:
        """The worker of this row is dead: its sessions are gone with it."""
        self.counts[row] = 0
        base = row * self.SLOTS
        self.slots[base:base + self.SLOTS] = [0] * self.SLOTS


class Harvest:
    """Recipients refused per client address across every worker and session (a
    harvester simply reconnects after the VALIDRCPTTO_LIMIT hang-up): past ``limit``
    within ``window`` seconds of its first refusal, an address is held back (its new
    sessions get 421 at the greeting) until the window has passed.

    One table in shared memory made before the workers, so it outlives any of them: a
    worker's death loses nothing.  Bounded: an address hashes to a bucket of WAYS
    slots; a new one takes a free or expired slot there, else the least recently seen
    one's (dropped).  No lock, as the connection limits: two workers counting for one
    address at the same instant may lose one count.  Each slot: the address's hash (0:
    free), refusals, when its window began, when it was last seen (wall clock)."""
    SLOTS, WAYS = 8192, 8

    def __init__(self, limit: int, window: float, workers: int):
        self.limit, self.window = limit, window
        if workers > 1:
            import multiprocessing
            self.table: Any = multiprocessing.RawArray("d", 4 * self.SLOTS)
        else:
            self.table = [0.0] * (4 * self.SLOTS)

    @staticmethod
    def key(ip: str) -> float:
        import zlib
        raw = ip.encode()
        return float((zlib.crc32(raw) << 20 | zlib.adler32(raw) & 0xFFFFF) + 1)

    def _find(self, ip: str, now: float, take: bool) -> int | None:
        """The slot of ``ip`` (with ``take``: a new one when it has none)."""
        t, key = self.table, self.key(ip)
        first = int(key) % (self.SLOTS // self.WAYS) * self.WAYS
        ways = range(first, first + self.WAYS)
        for i in ways:
            if t[4 * i] == key:
                return i
        if not take:
            return None
        def age(i: int) -> float:        # a free or expired slot first, then the oldest
            return -1.0 if not t[4 * i] or now - t[4 * i + 2] >= self.window else t[4 * i + 3]
        i = min(ways, key=age)
        t[4 * i:4 * i + 4] = [key, 0.0, now, now]
        return i

    def held(self, ip: str, now: float) -> bool:
        i = self._find(ip, now, take=False)
        t = self.table
        return i is not None and bool(t[4 * i + 1] >= self.limit and
                                      now - t[4 * i + 2] < self.window)

    def refused(self, ip: str, n: int, now: float) -> bool:
        """Count ``n`` refused recipients; whether this holds the address back now."""
        i = self._find(ip, now, take=True)
        assert i is not None
        t = self.table
        if now - t[4 * i + 2] >= self.window:          # a new window
            t[4 * i + 1], t[4 * i + 2] = 0.0, now
        before = t[4 * i + 1]
        t[4 * i + 1] = before + n
        t[4 * i + 3] = now
        return bool(before < self.limit <= before + n)
