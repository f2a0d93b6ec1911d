"""What changed between the live cdb and a new list: the keys added, removed and whose
value changed, for the log and the gate.  Two cdbs of sorted records that differ in
one stretch (the everyday case) are compared in that stretch only; otherwise the live
file is streamed once.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Container
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from ..checker import REJECT
from ..errors import InstallError
from ..limits import FILE_CHUNK, STRETCH_LIMIT
from .stablecdb import FileBytes, read_items


@dataclass
class Changes:
    added: list[bytes]
    removed: list[bytes]
    changed: list[bytes]         # in both lists, but the value (accept / ``-``) differs


def compare_live(path: str, keys: list[bytes], new: Container[bytes], rejects: AbstractSet[bytes],
                 image: Any = None, canonical: bool = True) -> Changes:
    """The changes from the live cdb to the sorted ``keys``.  When the live file is
    ``canonical`` (sorted records, none unreachable: a full build's) and differs from
    the new ``image`` only in a small stretch (the everyday case: a user added or
    removed), only that stretch is parsed; otherwise one streaming pass over what the
    live file's lookups find (a million-key list is never held twice).  A live file
    that cannot be parsed counts as empty."""
    if image is not None and canonical:
        try:
            with open(path, "rb") as f:
                quick = changed_stretch(FileBytes(f.fileno()), image, keys, rejects, new)
        except (OSError, ValueError, struct.error):
            quick = None
        if quick is not None:
            return quick
    import cdbx
    removed: list[bytes] = []
    turned: list[bytes] = []                 # live "-" keys that now accept
    try:
        db = cdbx.CDB(path)
    except Exception:
        return Changes(list(keys), [], [])
    try:
        # cdbx walks the data section, which is exact only for a canonical file
        for k, v in (db.items(all=True) if canonical else read_items(path)):
            if k not in new:
                removed.append(k)
            elif v and k not in rejects:
                turned.append(k)
        added = [k for k in keys if k not in db]
        changed = turned + [k for k in rejects if k in db and db.get(k) != REJECT]
    except Exception:
        return Changes(list(keys), [], [])
    finally:
        db.close()
    return Changes(added, sorted(removed), sorted(changed))


def same_content(path: str, image: mmap.mmap) -> bool | None:
    """Whether the live file holds exactly ``image`` (compared a chunk at a time);
    None when there is no live file."""
    try:
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != len(image):
                return False
            for offset in range(0, len(image), FILE_CHUNK):
                if f.read(FILE_CHUNK) != image[offset:offset + FILE_CHUNK]:
                    return False
            return True
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InstallError(f"cannot read the live cdb: {err.strerror}", path) from None


def live_header(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(2048)
    except OSError as err:
        raise InstallError(f"cannot read the live cdb: {err.strerror}", path) from None




def changed_stretch(old: Any, image: Any, keys: list[bytes], rejects: AbstractSet[bytes],
                    new: Container[bytes]) -> Changes | None:
    """The changes between two cdbs whose records differ only in one stretch (pure).

    Both files keep their records from byte 2048 up to their hash tables.  The records
    before the first differing byte are the same in both, and so are those after the
    last one (checked: the old file's records must parse to exactly that point), so only
    the records in between are compared.  None when the files are not laid out that way
    or the stretch is too big to be worth it (the caller then streams the whole file)."""
    from array import array
    from bisect import bisect_left
    from itertools import accumulate
    if len(old) < 2048 or len(image) < 2048:
        return None
    old_end = min(struct.unpack("<512L", old[:2048])[0::2])
    new_end = min(struct.unpack("<512L", image[:2048])[0::2])
    if not 2048 <= old_end <= len(old) or not 2048 <= new_end <= len(image):
        return None
    same_head = _common(old, image, 2048, old_end, new_end)
    same_tail = _common(old, image, 2048 + same_head, old_end, new_end, from_end=True)
    # where new record i starts: 8 bytes of lengths per record, the keys, the "-" values
    key_bytes = array("Q", accumulate(map(len, keys), initial=0))
    reject_at = sorted(i for i in (bisect_left(keys, r) for r in rejects)
                       if i < len(keys) and keys[i] in rejects)

    def start(i: int) -> int:
        return 2048 + 8 * i + key_bytes[i] + bisect_left(reject_at, i)

    lo, hi = 0, len(keys)                    # last record start inside the common head
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if start(mid) <= 2048 + same_head:
            lo = mid
        else:
            hi = mid - 1
    first = lo
    lo, hi = first, len(keys)                # first record start inside the common tail
    while lo < hi:
        mid = (lo + hi) // 2
        if start(mid) >= new_end - same_tail:
            hi = mid
        else:
            lo = mid + 1
    last = lo
    old_from, old_to = start(first), old_end - (new_end - start(last))
    if old_to < old_from or old_to - old_from > STRETCH_LIMIT:
        return None
    stretch = old[old_from:old_to]
    before: dict[bytes, bytes] = {}
    pos = 0
    while pos + 8 <= len(stretch):
        klen, dlen = struct.unpack_from("<LL", stretch, pos)
        before[stretch[pos + 8:pos + 8 + klen]] = stretch[pos + 8 + klen:pos + 8 + klen + dlen]
        pos += 8 + klen + dlen
    if pos != len(stretch):
        return None
    after = {k: (REJECT if k in rejects else b"") for k in keys[first:last]}
    return Changes(sorted(k for k in after if k not in before),
                   sorted(k for k in before if k not in new),
                   sorted(k for k in after if k in before and before[k] != after[k]))


def _common(a: Any, b: Any, start: int, end_a: int, end_b: int, from_end: bool = False) -> int:
    """Length of the common beginning (or end) of a[start:end_a] and b[start:end_b],
    compared a chunk at a time, then by halving inside the first chunk that differs."""
    n = min(end_a, end_b) - start

    def piece(data: Any, end: int, lo: int, hi: int) -> bytes:
        """Bytes lo..hi, counted from that side."""
        got: bytes = data[end - hi:end - lo] if from_end else data[start + lo:start + hi]
        return got
    done = 0
    while done < n:
        size = min(FILE_CHUNK, n - done)
        x, y = piece(a, end_a, done, done + size), piece(b, end_b, done, done + size)
        if x != y:
            lo, hi = 0, size                 # the first lo bytes agree, the first hi do not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                same = x[size - mid:] == y[size - mid:] if from_end else x[:mid] == y[:mid]
                lo, hi = (mid, hi) if same else (lo, mid)
            return done + lo
        done += size
    return n


def record_count(data: bytes) -> int | None:
    """Records in a cdb, from its 2048-byte header: each of the 256 tables has twice as
    many slots as records (as cdbmake and cdbx write them).  None for a file too short
    to be a cdb."""
    if len(data) < 2048:
        return None
    slots: int = sum(struct.unpack_from("<512L", data, 0)[1::2])
    return slots // 2
