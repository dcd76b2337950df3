"""Same-host shared memory: large payloads travel as handles to a sender's reused segments.

Two bus parties on one host (an attached client and its hub) need not push a large payload
through a socket (copied into the kernel, out of it, and by ZeroMQ on the way): the sender copies
it once into a segment of its :class:`Pool` (or serializes it straight into one, as pyarrow's IPC
writer does with an Arrow batch: :meth:`Pool.lease_filled`) and sends an ``SHM`` message
(``dpipes.bus.codec``) naming where it lies; the receiver maps the segment and hands its reader ``memoryview``s over it
(zero-copy; Arrow buffers over them are zero-copy too). When the reader has dropped every view of
a message, the receiver sends ``SHM_FREE`` and the sender reuses the space. The ``SHM`` messages a
sender makes in one pass of its loop leave together at its end (:func:`handle_frames`), a
stream's run of them as one ``SHM_BATCH`` to a receiver that takes those: one transfer to send,
route and wake the receiver for, not one per message (a stream of 1 MiB chunks took 30 us of its
hub's CPU per chunk one by one, 15-18 eight to a transfer).

Segments
    A segment is a ``memfd_create(2)`` file, mapped ``MAP_SHARED | MAP_POPULATE`` (pre-faulted
    once, then reused). It has no name in ``/dev/shm`` or anywhere: the kernel frees its memory
    when the last process that maps it unmaps it or dies, so a ``kill -9`` of either side leaks
    nothing on the host. A receiver opens it as ``/proc/PID/fd/FD`` of the sender, after checking
    that this descriptor is the memfd the handle names (its random token is in the memfd's name),
    and closes the descriptor once mapped. Handles are ``PID:FD:TOKEN:SIZE`` strings; a message's
    payload lies at an offset into its segment, and a receiver checks that it lies inside.

Who may receive handles
    Only a party on the same host, same PID namespace and same user: :func:`host_id` says that in
    one string, exchanged when a client attaches over ``ipc://`` (``ATTACH.host``, ``ATTACHED.shm``).
    Everything else gets the payload inline as before; so does anyone when the pool is full (no
    waiting: a reader that keeps its views forever slows nothing but itself). The sender could
    still write into bytes its receiver has checked (an Arrow batch's offsets, say): that is why
    only a process of the same user, which could as well attach a debugger to the receiver, is
    ever offered shared memory.

The pool's credit
    A :class:`Pool` holds at most ``POOL_BYTES``. Space is taken per message (a *lease*) and given
    back by ``SHM_FREE`` or, for every lease sent to a party, when that party is gone
    (:meth:`Pool.reclaim`): a receiver killed with its views in hand cannot pin the pool. A
    payload under ``SHARED_LEASE_BYTES`` is cut from a ``SHARED_SEGMENT_BYTES`` segment, after the
    leases before it (at ``LEASE_ALIGN``); that segment is cut again from its start once every
    lease in it is back. A stream of 10k-row Arrow batches (some 640 KB each) then fills a few
    segments, not one segment per batch: fewer segments to make and for the receiver to map. A
    larger payload takes a power-of-two segment of its own, reused as soon as it is back: the
    segment freed last is the one taken next (its pages are likely still in the CPU's cache), and
    what circulates is what is in flight, not whole shared segments waiting for their last lease.
    A payload of a class under ``SHARED_SEGMENT_BYTES`` with none of its own free takes a free
    larger segment, up to a shared one, whole (from the pool, then from the stash: *Segments
    outlive their pool*) before one is made: a stream of 2.56 MB Arrow batches (4 MiB each) then
    runs in the segments a stream of smaller batches, or a reserve, left free.
    A hub copying a byte stream's chunks from another node for a same-host client leases them
    *packed* (up to ``PACKED_LEASE_BYTES``): cut from the shared segment right after the one
    before, with no padding, so that a plugin worker reads an Arrow batch spanning chunks in
    place. A ``BYTES`` message's frames lie end to end in its lease and go as one frame.

Credit of a stream in shared memory
    A stream's credit (``dpipes.bus.codec``, *Flow control*) still bounds what its sender has
    in flight, but its receiving endpoint opens the stream's window to ``SHARED_WINDOW_BYTES``
    once a message of it arrives in shared memory (a ``CREDIT`` for the difference): the bytes
    wait in no socket buffer, and the default window kept a sender waiting for credit every few
    1 MiB messages.

Segments outlive their pool
    Making a segment and pre-faulting it costs about 0.7 ms per MiB (the kernel zeroes every page),
    some twenty times the copy into it. A process that attaches clients one after another (a fresh
    client per job) would pay that again for each; so a closing client waits (briefly) for its
    hub to give back what it still reads, and a pool that closes leaves its free segments
    (none a receiver still reads) to the process's next pool, up to ``STASH_BYTES`` in all, the
    oldest given back first (:func:`drop_stash` gives them all back to the kernel). A forked child
    forgets its parent's.

A reserve made at attach
    A stream that outgrows the segments a pool already has makes one mid-flow, and making one
    costs more than the copies of the leases cut from it (an 8 MiB segment, some 6 ms: a stream
    of a hundred 10k-row Arrow batches, 7 ms in all, ran at half its speed when it made one). A
    sender that knows what it will stream asks for a reserve (``Client(shm_reserve=NBYTES)``,
    :class:`Pool` ``reserve``): the pool makes that many bytes of shared segments (those payloads
    under ``SHARED_LEASE_BYTES`` are cut from, and a payload up to ``SHARED_SEGMENT_BYTES`` takes
    whole; from the stash first) pre-faulted and free at attach (:meth:`Pool.fill_reserve`), so a
    stream of such payloads that keeps no more than that in flight makes none while it runs
    (:attr:`Pool.made` and :attr:`Pool.from_stash` count what a pool added; when only small
    payloads were cut from it, five 64 MB streams of 2.56 MB Arrow batches beside a 512 MB reserve
    made 16-24 segments of 4 MiB, the first stream 65 ms of its sender's CPU against 5). A
    reserve is part of the pool's cap, never above it (:func:`check_reserve`); a larger payload
    that needs a segment when the cap is reached takes the room of free segments of other sizes
    (:meth:`Pool._make_room`), the reserve's included. Once a pool of the process asked for a
    reserve, the stash keeps up to that much (the largest asked, if more than
    ``STASH_BYTES``): the process's next clients, with a reserve or without, take it back instead
    of making it again (a 512 MB reserve made anew per client cost 0.4-1 s of CPU at each
    attach). :func:`drop_stash` empties the stash and brings its bound back to ``STASH_BYTES``.

This module is the sending side and what both sides share; the receiving side (mappings, views,
``SHM_FREE`` in batches) is ``dpipes.bus.shm_receive``, whose names this module offers too.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from dpipes.bus import codec
from dpipes.bus.shm_receive import (  # the receiving side, named here too
    FREE_BATCH_BYTES,
    FREE_BATCH_LEASES,
    FREE_DELAY_S,
    MAX_HANDLE_CHARS,
    MAX_MAPPED_SEGMENTS,
    Frees,
    Reader,
    call_later,
    call_soon,
)

log = logging.getLogger(__name__)

__all__ = [
    "FREE_BATCH_BYTES",
    "FREE_BATCH_LEASES",
    "FREE_DELAY_S",
    "LEASE_ALIGN",
    "MAX_HANDLE_CHARS",
    "MAX_MAPPED_SEGMENTS",
    "MIN_PAYLOAD_BYTES",
    "MIN_SEGMENT_BYTES",
    "PACKED_LEASE_BYTES",
    "POOL_BYTES",
    "SHARED_LEASE_BYTES",
    "SHARED_SEGMENT_BYTES",
    "SHARED_WINDOW_BYTES",
    "SHM_BATCH_MEMBERS",
    "STASH_BYTES",
    "Frees",
    "Lease",
    "Pool",
    "Reader",
    "call_later",
    "call_soon",
    "check_reserve",
    "drop_stash",
    "handle_frames",
    "host_id",
    "shared_member",
]

MIN_PAYLOAD_BYTES = 256 * 1024  # smaller payloads cost less through the socket than a lease's round trip
MIN_SEGMENT_BYTES = 1 << 20  # a 1 MiB chunk fits one segment of the smallest class
SHARED_SEGMENT_BYTES = 8 << 20  # payloads under SHARED_LEASE_BYTES are cut end to end from one of these
# Payloads this large or larger take a power-of-two segment of their own: a stream of 1 MiB chunks
# cut eight to a shared segment kept 24-40 MiB circulating (a segment is free only when its last
# lease is), more than a 32 MiB L3; with a segment each, what is in flight.
SHARED_LEASE_BYTES = MIN_SEGMENT_BYTES
# A byte stream's chunks (reads of up to 1 MiB, dpipes.nodes.supervisor.READ_CHUNK_BYTES) from
# another node, for a plugin worker here, are cut end to end from the shared segments instead
# (Pool.lease's ``packed``): an Arrow IPC stream's batches (1.8 MB at 64k rows) span two or three
# chunks, and in a segment each the worker copied every such batch out to read it in one piece.
PACKED_LEASE_BYTES = MIN_SEGMENT_BYTES
LEASE_ALIGN = 64  # where a lease starts in a shared segment: Arrow's buffer alignment
POOL_BYTES = 512 << 20  # a sender's segments in all: room for several 64 MB Arrow batches in flight
STASH_BYTES = 128 << 20  # free segments a process keeps from its closed pools for the next ones
# SHM messages of one stream sent in one SHM_BATCH at most: a sender lets its loop run every
# dpipes.bus.streams.YIELD_EVERY_BYTES, so a pass makes eight of 1 MiB chunks, 32 of the smallest
# shared; a hub relays a drain's worth of a link's chunks (dpipes.bus.pump.DRAIN_BATCH_MESSAGES).
SHM_BATCH_MEMBERS = 64
# A stream whose payloads arrive in shared memory gets this window (credit units) at its
# receiver, not the default 8 MiB: its bytes wait in no socket buffer, and a window of 8 x 1 MiB
# kept a sender on one host waiting for credit every few messages (1 MiB messages from a client
# to its hub: 0.126 -> 0.086 CPU s/GB of both processes, 12.7 -> 18.8 GB/s, medians). Credit
# still bounds what is in flight: at most this much of a sender's pool per stream. Not much
# more: past the last-level cache (32 MiB here) 64 MiB ran slower than 32.
SHARED_WINDOW_BYTES = 32 << 20


def check_reserve(reserve: int, limit: int = POOL_BYTES) -> int:
    """The bytes of shared segments a reserve of ``reserve`` bytes takes (whole segments).

    Raises:
        ConfigError: ``reserve`` is negative, or above the pool's cap ``limit``.
    """
    from dpipes.bus.errors import ConfigError

    if type(reserve) is not int or reserve < 0:
        raise ConfigError(f"shm_reserve must be a number of bytes, 0 or more, not {reserve!r:.40}")
    segments = -(-reserve // SHARED_SEGMENT_BYTES)
    if segments * SHARED_SEGMENT_BYTES > limit:
        most = limit // SHARED_SEGMENT_BYTES * SHARED_SEGMENT_BYTES
        raise ConfigError(
            f"shm_reserve of {reserve} bytes ({segments} segments of {SHARED_SEGMENT_BYTES} bytes) is above "
            f"the shared-memory pool's cap of {limit} bytes: ask for at most {most}"
        )
    return segments * SHARED_SEGMENT_BYTES


def host_id() -> str:
    """Who can open this process's memfds by ``/proc/PID/fd``: same boot, PID namespace and user."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""  # not Linux, or no /proc: no shared memory
    if not hasattr(os, "memfd_create"):
        return ""
    return f"{boot}/{pidns}/{os.getuid()}"


@dataclasses.dataclass(eq=False)
class _Segment:
    """One memfd of the pool, mapped here."""

    handle: str
    fd: int
    map: mmap.mmap
    size: int
    at: int = 0  # a shared segment: where the next lease in it starts
    live: int = 0  # leases in it not given back yet


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """Where one message's payload lies in a sender's segment: ``offset`` bytes into it, its
    frames (``sizes`` bytes each) end to end."""

    id: int
    handle: str
    sizes: tuple[int, ...]
    offset: int = 0


def _aligned(nbytes: int) -> int:
    return (nbytes + LEASE_ALIGN - 1) & -LEASE_ALIGN


class Pool:
    """A sender's shared-memory segments: leases taken per message, given back when read."""

    def __init__(self, *, limit: int = POOL_BYTES, reserve: int = 0) -> None:
        self.limit = limit
        self.reserve = check_reserve(reserve, limit)  # bytes of shared segments made free at attach
        _STASH.keep_at_least(self.reserve)
        self.made = 0  # segments this pool made (memfd_create and pre-fault)
        self.from_stash = 0  # segments it took from the process's stash instead
        self.used = 0  # bytes leased out now
        self.allocated = 0  # bytes of every segment, leased or free
        self._free: dict[int, list[_Segment]] = collections.defaultdict(list)  # by segment size
        self._shared: _Segment | None = None  # the segment small leases are cut from now
        self._leased: dict[int, tuple[_Segment, str, int]] = {}  # lease id -> its segment, to whom, bytes
        self._by_handle: dict[str, _Segment] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self.fallbacks = 0  # payloads sent inline because the pool was full

    def fill_reserve(self) -> int:
        """Add free shared segments (pre-faulted; from the stash first) until the pool holds
        ``reserve`` bytes of them; returns how many were added."""
        size = SHARED_SEGMENT_BYTES
        held = sum(1 for segment in self._by_handle.values() if segment.size == size)
        added: list[_Segment] = []
        while (held + len(added)) * size < self.reserve:
            segment = self._segment(size)
            if segment is None:  # closed, or the cap reached by segments of other sizes in use
                break
            added.append(segment)
        # Below what is free already (the free list is taken from its end), the first added
        # (the stash's newest: its pages the likeliest in cache) taken first.
        self._free[size][:0] = reversed(added)
        return len(added)

    def lease(self, frames: Sequence[Any], to: str, *, packed: bool = False) -> Lease | None:
        """Copy ``frames`` end to end into free room leased to party ``to``; None when full.

        ``packed``: a chunk of a byte stream (up to ``PACKED_LEASE_BYTES``), cut from the shared
        segment right where the lease before it ends, with no alignment padding: a stream's
        chunks leased in a row then lie end to end, and their reader can take what spans two of
        them as one view (``Lease.offset`` is then any byte).
        """
        placed = self._place(frames, to, packed)
        if placed is None:
            return None
        lease_id, handle, sizes, offset = placed
        return Lease(lease_id, handle, tuple(sizes), offset)

    def _place(self, frames: Sequence[Any], to: str, packed: bool) -> tuple[int, str, list[int], int] | None:
        """:meth:`lease`'s work, without a ``Lease`` made: (its id, handle, frame sizes, offset)."""
        views = [f if type(f) is bytes else memoryview(f).cast("B") for f in frames]
        sizes = [len(v) for v in views]  # bytes, or views of single bytes: each len() is its size
        taken = self._take(sum(sizes), to, packed=packed)
        if taken is None:
            return None
        lease_id, segment, offset = taken
        at = offset
        target = segment.map
        for view, n in zip(views, sizes, strict=True):
            target[at : at + n] = view
            at += n
        return lease_id, segment.handle, sizes, offset

    def lease_filled(self, nbytes: int, to: str, fill: Callable[[memoryview], Sequence[int]]) -> Lease | None:
        """Lease room for ``nbytes`` to party ``to`` and let ``fill`` write the payload there itself.

        The one copy of a payload a writer can serialize in place (an Arrow IPC writer onto the
        segment): ``fill`` gets a writable view of ``nbytes`` bytes, valid only during the call,
        and returns the payload's frame sizes. None when the pool is full (``fill`` not called);
        if ``fill`` raises, the lease is given back and the error goes on.
        """
        taken = self._take(nbytes, to)
        if taken is None:
            return None
        lease_id, segment, offset = taken
        view = memoryview(segment.map)[offset : offset + nbytes]
        try:
            sizes = tuple(fill(view))
            if sum(sizes) > nbytes:
                raise ValueError(f"a payload filled in place says {sum(sizes)} bytes, {nbytes} were leased")
        except BaseException:
            self.release([lease_id], to)
            raise
        finally:
            try:
                view.release()  # an exported view would keep the segment's map from closing
            except BufferError:  # still held by a failed fill's traceback: dropped with it
                pass
        return Lease(lease_id, segment.handle, sizes, offset)

    def _take(self, nbytes: int, to: str, *, packed: bool = False) -> tuple[int, _Segment, int] | None:
        """Room for ``nbytes`` leased to ``to``: its id, segment and offset; None when the pool is full."""
        packed = packed and nbytes <= PACKED_LEASE_BYTES
        if nbytes < SHARED_LEASE_BYTES or packed:
            segment = self._cut(nbytes, packed=packed)
            if segment is not None:
                offset = segment.at if packed else _aligned(segment.at)
                taken = offset + nbytes - segment.at  # with the padding before it, given back with it
        else:
            segment = self._segment(max(MIN_SEGMENT_BYTES, 1 << max(0, nbytes - 1).bit_length()))
            if segment is not None:
                taken = segment.size  # its class, or a larger free segment that holds it
            offset = 0
        if segment is None:
            self.fallbacks += 1
            return None
        segment.at += taken
        segment.live += 1
        lease_id = next(self._ids)
        self._leased[lease_id] = (segment, to, taken)
        self.used += taken
        return lease_id, segment, offset

    def _cut(self, nbytes: int, *, packed: bool = False) -> _Segment | None:
        """The shared segment with ``nbytes`` free at its end (after padding to ``LEASE_ALIGN``
        unless ``packed``): the one being cut, or a free one."""
        shared = self._shared
        if shared is not None and (shared.at if packed else _aligned(shared.at)) + nbytes <= shared.size:
            return shared
        # The one being cut is full: it goes back to the free list once its last lease does.
        self._shared = self._segment(SHARED_SEGMENT_BYTES)
        return self._shared

    def _segment(self, size: int) -> _Segment | None:
        """A free segment of ``size`` bytes (from the free list, the stash or new); None when full.

        Under ``SHARED_SEGMENT_BYTES``, a free larger one up to a shared segment (the reserve's, say)
        serves before one is made: making one mid-stream costs more than the copies into it.
        """
        most = max(size, SHARED_SEGMENT_BYTES)
        fits = size
        while fits <= most:
            free = self._free.get(fits)
            if free:
                return free.pop()
            fits <<= 1
        if self._closed:
            return None
        if self.allocated + size > self.limit and not self._make_room(size):
            return None
        segment = _STASH.take(size, min(most, self.limit - self.allocated))
        if segment is None:
            segment = self._create(size)
            self.made += 1
        else:
            self.from_stash += 1
        self._by_handle[segment.handle] = segment
        self.allocated += segment.size
        return segment

    def _make_room(self, size: int) -> bool:
        """Give free segments of other sizes back to the kernel until a new ``size``-byte one fits
        under the cap; False when it cannot (what is leased fills the pool)."""
        free = sum(len(segments) * other for other, segments in self._free.items() if other != size)
        if self.allocated - free + size > self.limit:
            return False
        for other, segments in self._free.items():
            while segments and other != size and self.allocated + size > self.limit:
                self._destroy(segments.pop(0))  # the longest free first
        return True

    def _create(self, size: int) -> _Segment:
        token = secrets.token_hex(8)
        fd = os.memfd_create(f"dpipes-{token}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            # Pre-faulted here, once: a reused segment costs no page faults on either side.
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError:
            os.close(fd)
            raise
        segment = _Segment(f"{os.getpid()}:{fd}:{token}:{size}", fd, mapped, size)
        log.debug("shm pool: new %d-byte segment %s (%d bytes before it)", size, segment.handle, self.allocated)
        return segment

    def release(self, lease_ids: Sequence[int], by: str, *, trusted: str = "") -> int:
        """Give back leases that party ``by`` has done with; others' ids are ignored. Returns how many.

        ``trusted`` names a party that may give back any lease (the hub, which copied it out itself).
        """
        done = 0
        for lease_id in lease_ids:
            held = self._leased.get(lease_id)
            if held is None or (held[1] != by and by != trusted):
                continue
            del self._leased[lease_id]
            self._give_back(held[0], held[2])
            done += 1
        return done

    def reclaim(self, party: str) -> int:
        """Party ``party`` is gone: every lease it held is free again. Returns how many."""
        ids = [i for i, (_s, to, _n) in self._leased.items() if to == party]
        return self.release(ids, party)

    def reclaim_all(self) -> int:
        """Every party we leased to is gone (our hub is lost): every lease is free again."""
        ids = list(self._leased)
        for lease_id in ids:
            segment, _to, taken = self._leased.pop(lease_id)
            self._give_back(segment, taken)
        return len(ids)

    def _give_back(self, segment: _Segment, taken: int) -> None:
        self.used -= taken
        segment.live -= 1
        if segment.live:
            return
        segment.at = 0  # nobody reads any of it: cut it again from the start
        if segment is not self._shared:
            self._free[segment.size].append(segment)

    def _destroy(self, segment: _Segment) -> None:
        self._by_handle.pop(segment.handle, None)
        self.allocated -= segment.size
        _close_segment(segment)

    @property
    def leased(self) -> int:
        """Leases not given back yet."""
        return len(self._leased)

    def close(self) -> None:
        """Unmap and close every segment (receivers keep their own mappings as long as they need);
        free ones go to the process's stash. Idempotent."""
        if self._closed:
            return
        self._closed = True
        free = [segment for segments in self._free.values() for segment in segments]
        if self._shared is not None and not self._shared.live:
            free.append(self._shared)
        for segment in free:
            self._by_handle.pop(segment.handle, None)
            self.allocated -= segment.size
            if not _STASH.put(segment):
                _close_segment(segment)
        self._free.clear()
        self._shared = None
        for segment in {id(s): s for s, _to, _n in self._leased.values()}.values():
            self._destroy(segment)
        self._leased.clear()
        self.used = 0


def _close_segment(segment: _Segment) -> None:
    segment.map.close()
    os.close(segment.fd)


class _Stash:
    """Free segments of this process's closed pools, for its next pools (thread-safe: clients of
    several threads may close and attach at once).

    Past ``STASH_BYTES``, the segments stashed longest ago go back to the kernel first: the pools
    closed last say best what the next will need (a stream of 10k-row Arrow batches after one of
    64 MB batches kept only 8 of the 8 MiB segments it needs beside the unused 64 MiB one, and made
    one or two again per run).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Segment] = []  # oldest first
        self.bytes = 0
        self.reserved = 0  # the largest reserve of a pool of this process: kept beyond STASH_BYTES

    def take(self, size: int, most: int) -> _Segment | None:
        """A stashed segment of ``size`` bytes, else of the next larger size there, up to ``most``."""
        with self._lock:
            fits = size
            while fits <= most:
                for i in range(len(self._free) - 1, -1, -1):  # the newest: its pages are the likeliest in cache
                    if self._free[i].size == fits:
                        self.bytes -= fits
                        return self._free.pop(i)
                fits <<= 1
            return None

    def keep_at_least(self, nbytes: int) -> None:
        """Keep up to ``nbytes`` from now on if that is more than ``STASH_BYTES`` (a pool's reserve)."""
        with self._lock:
            self.reserved = max(self.reserved, nbytes)

    def put(self, segment: _Segment) -> bool:
        """Keep ``segment`` (free: nobody reads it) for a later pool, giving back older ones to
        make room; False when it alone is larger than the stash."""
        keep = max(STASH_BYTES, self.reserved)
        if segment.size > keep:
            return False
        with self._lock:
            evicted = []
            while self.bytes + segment.size > keep:
                oldest = self._free.pop(0)
                self.bytes -= oldest.size
                evicted.append(oldest)
            self._free.append(segment)
            self.bytes += segment.size
        for old in evicted:
            _close_segment(old)
        return True

    def drop(self) -> int:
        """Unmap and close every stashed segment, and keep no more than ``STASH_BYTES`` from now on;
        returns the bytes given back."""
        with self._lock:
            segments, self._free = self._free, []
            dropped, self.bytes, self.reserved = self.bytes, 0, 0
        for segment in segments:
            _close_segment(segment)
        return dropped

    def forget_at_fork(self) -> None:
        """In a forked child: drop the parent's segments (both would write into them), with a new
        lock (another thread of the parent may have held it at the fork)."""
        self._lock = threading.Lock()
        self.drop()


_STASH = _Stash()
os.register_at_fork(after_in_child=_STASH.forget_at_fork)


def drop_stash() -> int:
    """Give the segments this process keeps from its closed pools back to the kernel, and keep no more
    than ``STASH_BYTES`` from now on (a reserve asked for before is forgotten); returns their bytes."""
    return _STASH.drop()


def shared_member(
    pool: Pool, header: dict[str, Any], frames: Sequence[Any], *, packed: bool = False
) -> dict[str, Any] | None:
    """The message ``header`` + ``frames``, its payload copied into a lease of ``pool`` for the
    message's ``dst``, as the keys of the ``SHM`` standing for it that say where the payload lies
    and the message's kind fields (``fields``, ``handle``, ``lease``, ``sizes``, ``offset``): one
    member of a ``SHM_BATCH`` (:func:`handle_frames`); None when that kind cannot be or the pool
    is full.

    ``header`` is a whole decoded header (its common keys all there). ``packed``: a ``BYTES``
    message's payload is leased packed (:meth:`Pool.lease`), end to end with the one before it."""
    kind = header["kind"]
    if kind not in codec.SHM_KINDS:
        return None
    placed = pool._place(frames, header["dst"], packed and kind == "BYTES")
    if placed is None:
        return None
    lease_id, handle, sizes, offset = placed
    if kind == "BYTES" and len(sizes) > 1:
        sizes = _joined(sizes, codec.MAX_PAYLOAD_FRAME_BYTES)
    member: dict[str, Any] = {"handle": handle, "lease": lease_id, "sizes": sizes, "offset": offset}
    if len(header) > len(codec._COMMON_KEYS):  # kind fields (a byte chunk's header has none)
        member["fields"] = {k: v for k, v in header.items() if k not in codec._COMMON_KEYS}
    return member


def handle_frames(handles: Sequence[tuple[dict[str, Any], dict[str, Any]]], *, batch: bool) -> list[bytes]:
    """The header frames that carry ``handles`` (each a message's decoded header and its lease,
    :func:`shared_member`), in order: each as an ``SHM``, or (``batch``: the receiver takes
    ``SHM_BATCH``) the consecutive messages of a stream as one ``SHM_BATCH`` of up to
    ``SHM_BATCH_MEMBERS``, split where its header would pass ``MAX_HEADER_BYTES`` (an Arrow
    batch's kind fields are long)."""
    out: list[bytes] = []
    count = len(handles)
    i = 0
    while i < count:
        header, member = handles[i]
        members = [member]
        i += 1
        if batch and header["sid"]:
            kind, dst, sid, seq = header["kind"], header["dst"], header["sid"], header["seq"]
            while i < count and len(members) < SHM_BATCH_MEMBERS:
                after = handles[i][0]
                if after["sid"] != sid or after["dst"] != dst or after["kind"] != kind:
                    break
                if after["seq"] != seq + len(members) or after["src"] != header["src"]:
                    break
                members.append(handles[i][1])
                i += 1
        _pack_run(out, header["src"], header["dst"], header["sid"], header["seq"], header["kind"], members)
    return out


def _pack_run(out: list[bytes], src: str, dst: str, sid: int, seq: int, of: str, members: list[dict[str, Any]]) -> None:
    frame = codec.packb_shms(src, dst, sid, seq, of, members)
    if len(frame) <= codec.MAX_HEADER_BYTES or len(members) == 1:
        out.append(frame)
        return
    half = len(members) // 2
    _pack_run(out, src, dst, sid, seq, of, members[:half])
    _pack_run(out, src, dst, sid, seq + half, of, members[half:])


def _joined(sizes: list[int], limit: int) -> list[int]:
    """A byte chunk's frame sizes as few frames of at most ``limit`` bytes each.

    A ``BYTES`` message's frames are only where its writer cut it (an Arrow IPC writer's batch is
    a frame per buffer, and small ones between); in a lease they lie end to end, so its reader
    takes them as one view, and every hub that relays it and every reader that writes it to a
    program handles one frame, not six or more.
    """
    out = [0]
    for size in sizes:
        if out[-1] and out[-1] + size > limit:
            out.append(0)
        out[-1] += size
    return out
