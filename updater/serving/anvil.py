"""The connection limits of the --listen server (Postfix's anvil): sessions in all and
per client address, shared by the worker processes."""

from __future__ import annotations

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

    def __init__(self, total: int, per_ip: int, workers: int):
        self.total, self.per_ip, self.workers = total, per_ip, workers
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

    def take(self, ip: str) -> bytes | None:
        """None when the connection may go on, else the reply that refuses it."""
        if sum(self.counts) >= self.total:
            return R_BUSY
        slot = self.slot(ip)
        if self.per_ip and sum(self.slots[r * self.SLOTS + slot]
                               for r in range(self.workers)) >= self.per_ip:
            return R_BUSY_IP
        self.counts[self.row] += 1
        self.slots[self.row * self.SLOTS + slot] += 1
        return None

    def give(self, ip: str) -> None:
        self.counts[self.row] -= 1
        self.slots[self.row * self.SLOTS + self.slot(ip)] -= 1

    def clear(self, row: int) -> None:
        """The worker of this row is dead: its sessions are gone with it."""
        self.counts[row] = 0
        base = row * self.SLOTS
        self.slots[base:base + self.SLOTS] = [0] * self.SLOTS
