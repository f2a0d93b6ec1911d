"""A cdb whose records keep their place: what an incremental install writes.

A cdb is a 2048-byte header (256 pairs: where each hash table starts, how many slots it
has), the records (key length, value length, key, value), then the 256 tables, each
slot a (hash, record position) pair.  A lookup reads only the header, one table and the
records its slots point to, so a record no slot points to is never found by anyone: the
C patch, ``cdbget``, cdbx and our servers.

``rewrite`` makes the next file from the live one without moving a record: the live
file's records are copied in the kernel (``copy_file_range``; a reflink where the file
system shares blocks), the new records are appended after them, the tables that neither
gained nor lost a key are copied as they were, and only the others are built again.  A
removed (or changed) key's old record stays behind as garbage until a compaction (any
full build, or ``MAX_GARBAGE`` of the file) writes the sorted canonical file again.  So
a one-address change writes a few bytes of new records and one table, and an rsync push
of the result finds everything else in place.

``reachable`` lists what lookups find (``cdbdump`` walks the data section and would show
the garbage too); it is how this project reads its own live file.  Pure of policy: the
install decides when to compact.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import BinaryIO

from ..checker import REJECT
from ..limits import COPY_CHUNK, MAX_REBUILT

HEADER = 2048             # 256 x (table position, slot count), 32-bit little-endian
LIMIT = 0xFFFFFFFF        # every position in a cdb is 32 bits


def write_cdb(f: BinaryIO, keys: list[bytes], rejects: AbstractSet[bytes]) -> None:
    """The cdb of the sorted ``keys`` (``rejects`` with the value ``-``) into the open
    file ``f``, records in key order: the same keys give the same bytes."""
    import cdbx
    maker = cdbx.CDB.make(f)
    add = maker.add
    if rejects:
        for key in keys:
            add(key, REJECT if key in rejects else b"")
    else:
        for key in keys:
            add(key, b"")
    maker.commit().close()
    f.flush()


def make_cdb(keys: list[bytes], rejects: AbstractSet[bytes]) -> mmap.mmap:
    """The complete cdb image, built in memory (a memfd: nothing touches the disk) and
    returned as a read-only map of it, so it is never copied."""
    fd = os.memfd_create("validrcptto.cdb") if hasattr(os, "memfd_create") else None
    f = os.fdopen(fd, "w+b") if fd is not None else tempfile.TemporaryFile()
    with f:
        write_cdb(f, keys, rejects)
        return mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, prot=mmap.PROT_READ)


class FileBytes:
    """A file read by slices (``pread``): what a rewrite reads of the live cdb (its
    header, a few tables and records) without mapping it, so a file truncated in place
    by someone else is a short read (NotCdb), never a SIGBUS in the daemon."""

    def __init__(self, fd: int):
        self.fd, self.size = fd, os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        got = os.pread(self.fd, max(0, stop - start), start)
        if len(got) != max(0, stop - start):
            raise NotCdb(f"the file ended at {start + len(got)} (truncated under us?)")
        return got


Buffer = bytes | mmap.mmap | FileBytes


class NotCdb(ValueError):
    """The file is not laid out as a cdb (a table or a record outside the file)."""


class Cheaper(Exception):
    """A change this wide is written faster as the canonical file (a compaction)."""


def cdb_hash(key: bytes) -> int:
    """djb's cdb hash: h = ((h << 5) + h) ^ c from 5381, 32 bits."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


@dataclass(frozen=True)
class Layout:
    tables: tuple[tuple[int, int], ...]     # 256 x (position, slots)
    data_end: int                           # where the records end (the first table)
    size: int


def layout(buf: Buffer) -> Layout:
    size = len(buf)
    if size < HEADER:
        raise NotCdb(f"{size} bytes: shorter than a cdb header")
    head = struct.unpack("<512L", buf[0:HEADER])
    tables = tuple(zip(head[0::2], head[1::2], strict=True))
    for pos, slots in tables:
        if pos < HEADER or pos + 8 * slots > size:
            raise NotCdb(f"a hash table at {pos} with {slots} slots lies outside the file")
    return Layout(tables, min(pos for pos, _ in tables), size)


def slots_of(buf: Buffer, lay: Layout, i: int) -> array[int]:
    """Table ``i`` as a flat array: hash, position, hash, position, ..."""
    pos, slots = lay.tables[i]
    a = array("I")
    a.frombytes(buf[pos:pos + 8 * slots])
    if a.itemsize != 4 or struct.pack("=I", 1) != struct.pack("<I", 1):
        raise NotCdb("this machine's unsigned int is not a little-endian 32-bit word")
    return a


def record_at(buf: Buffer, lay: Layout, pos: int) -> tuple[bytes, bytes]:
    if not HEADER <= pos <= lay.data_end - 8:
        raise NotCdb(f"a slot points to {pos}, outside the records")
    klen, vlen = struct.unpack("<LL", buf[pos:pos + 8])
    end = pos + 8 + klen + vlen
    if end > lay.data_end:
        raise NotCdb(f"the record at {pos} runs past the records")
    return bytes(buf[pos + 8:pos + 8 + klen]), bytes(buf[pos + 8 + klen:end])


def find(buf: Buffer, lay: Layout, key: bytes) -> int | None:
    """The position of the record a lookup of ``key`` finds, or None."""
    h = cdb_hash(key)
    pos, slots = lay.tables[h & 255]
    if not slots:
        return None
    start = (h >> 8) % slots
    for n in range(slots):
        at = pos + 8 * ((start + n) % slots)
        sh: int
        rp: int
        sh, rp = struct.unpack("<LL", buf[at:at + 8])
        if rp == 0:
            return None
        if sh == h and record_at(buf, lay, rp)[0] == key:
            return rp
    return None


def positions(buf: Buffer, lay: Layout) -> set[int]:
    """Every record position a table slot points to."""
    live: set[int] = set()
    for i in range(256):
        live.update(slots_of(buf, lay, i)[1::2])
    live.discard(0)
    return live


def reachable(buf: bytes | mmap.mmap) -> Iterator[tuple[bytes, bytes]]:
    """What lookups find: each (key, value) a table slot points to, in file order.  For
    a file without garbage this is ``cdbdump``'s list.  Raises NotCdb (records do not
    lie back to back, as every cdb writer lays them, or a slot points between them)."""
    lay = layout(buf)
    live = positions(buf, lay)
    lengths = struct.Struct("<LL").unpack_from
    pos, end, found = HEADER, lay.data_end, 0
    while pos < end:
        if pos + 8 > end:
            raise NotCdb(f"a record at {pos} runs past the records")
        klen, vlen = lengths(buf, pos)
        nxt = pos + 8 + klen + vlen
        if nxt > end:
            raise NotCdb(f"the record at {pos} runs past the records")
        if pos in live:
            found += 1
            yield buf[pos + 8:pos + 8 + klen], buf[pos + 8 + klen:nxt]
        pos = nxt
    if found != len(live):
        raise NotCdb(f"{len(live) - found} table slot(s) point between records")


def read_items(path: str) -> Iterator[tuple[bytes, bytes]]:
    """``reachable`` of the file at ``path`` (OSError, NotCdb)."""
    fd, buf = open_map(path)
    try:
        yield from reachable(buf)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
        os.close(fd)


def open_file(path: str) -> tuple[int, FileBytes]:
    """(descriptor, the file read by slices) of a regular file, never followed through a
    symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not os.fstat(fd).st_mode & 0o170000 == 0o100000:
            raise NotCdb("not a regular file")
        return fd, FileBytes(fd)
    except BaseException:
        os.close(fd)
        raise


def open_map(path: str) -> tuple[int, mmap.mmap | bytes]:
    """(descriptor, read-only map) of a regular file, never followed through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise NotCdb("not a regular file")
        buf: mmap.mmap | bytes = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) \
            if st.st_size else b""
    except BaseException:
        os.close(fd)
        raise
    return fd, buf


def copy_range(src: int, dst: int, start: int, length: int, to: int) -> None:
    """Bytes ``start``.. of ``src`` to ``to``.. of ``dst``, in the kernel when it can."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, min(COPY_CHUNK, length - done), start + done,
                                   to + done)
        except OSError:                       # EXDEV, ENOSYS, EINVAL: copy by hand
            n = 0
        if n <= 0:
            data = os.pread(src, min(COPY_CHUNK, length - done), start + done)
            if not data:
                raise OSError(f"the live cdb ended at {start + done}")
            n = os.pwrite(dst, data, to + done)
        done += n


def place(entries: list[tuple[int, int]]) -> bytes:
    """A table for ``entries`` (hash, position), twice as many slots as entries, each at
    (hash >> 8) % slots or the next free one, in the given order (as cdbmake does)."""
    slots = 2 * len(entries)
    table = array("I", bytes(8 * slots))
    for h, p in entries:
        at = (h >> 8) % slots
        while table[2 * at + 1]:
            at = (at + 1) % slots
        table[2 * at], table[2 * at + 1] = h, p
    return table.tobytes()


def write_tables(src: int, dst: int, buf: Buffer, lay: Layout,
                 gone: dict[int, set[int]], added: dict[int, list[tuple[int, int]]],
                 at: int) -> tuple[list[int], int]:
    """The 256 tables from ``at`` on: those with no record ``gone`` or ``added`` copied
    from the live file (runs of them in one call), the others built again.  Returns the
    header's 512 numbers and where the file ends."""
    head: list[int] = []
    run: tuple[int, int, int] | None = None     # unchanged tables: (from, length, to)
    for i, (pos, slots) in enumerate(lay.tables):
        if i not in gone and i not in added:
            head += [at, slots]
            if run is not None and run[0] + run[1] == pos and run[2] + run[1] == at:
                run = (run[0], run[1] + 8 * slots, run[2])
            else:
                if run is not None:
                    copy_range(src, dst, *run)
                run = (pos, 8 * slots, at)
            at += 8 * slots
            continue
        if run is not None:
            copy_range(src, dst, *run)
            run = None
        old = slots_of(buf, lay, i)
        left = gone.get(i, set()) | {0}
        entries = [e for e in zip(old[0::2], old[1::2], strict=True) if e[1] not in left]
        entries.sort(key=lambda e: e[1])
        table = place(entries + added.get(i, []))
        os.pwrite(dst, table, at)
        head += [at, len(table) // 8]
        at += len(table)
    if run is not None:
        copy_range(src, dst, *run)
    return head, at


def rewrite(src: int, buf: Buffer, out: BinaryIO, drop: Iterable[bytes],
            put: Iterable[tuple[bytes, bytes]]) -> int:
    """Write into ``out`` the cdb ``buf`` (open as ``src``) without the keys of ``drop``
    and with the records of ``put`` (a key already there is replaced: its old record is
    left behind).  Returns the bytes of records left behind.  Raises NotCdb,
    OverflowError for a file past 4 GiB (then only a compaction can write it), and
    Cheaper for a change that touches tables holding more than MAX_REBUILT of the slots
    (both before anything is written)."""
    lay = layout(buf)
    gone: defaultdict[int, set[int]] = defaultdict(set)
    garbage = 0
    records = sorted(put)
    for key in [*drop, *(k for k, _ in records)]:
        p = find(buf, lay, key)
        if p is not None:
            h = cdb_hash(key)
            if p not in gone[h & 255]:
                gone[h & 255].add(p)
                k, v = record_at(buf, lay, p)
                garbage += 8 + len(k) + len(v)
    added: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
    blob = bytearray()
    for k, v in records:
        h = cdb_hash(k)
        added[h & 255].append((h, lay.data_end + len(blob)))
        blob += struct.pack("<LL", len(k), len(v)) + k + v
    at = lay.data_end + len(blob)
    slots = sum(s for _, s in lay.tables)
    if at + 8 * slots + 16 * len(records) > LIMIT:
        raise OverflowError("the cdb would pass 4 GiB")
    rebuilt = sum(lay.tables[i][1] for i in gone.keys() | added.keys())
    if rebuilt > MAX_REBUILT[0] * slots and rebuilt > MAX_REBUILT[1]:
        raise Cheaper(f"{len(gone.keys() | added.keys())} of 256 tables change")
    dst = out.fileno()
    out.flush()
    copy_range(src, dst, 0, lay.data_end, 0)
    os.pwrite(dst, bytes(blob), lay.data_end)
    head, at = write_tables(src, dst, buf, lay, gone, added, at)
    os.pwrite(dst, struct.pack("<512L", *head), 0)
    os.ftruncate(dst, at)
    out.seek(at)
    return garbage
