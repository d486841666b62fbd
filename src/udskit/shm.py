"""Shared memory for a channel: the memfd pool, its seals, the mappings, and who holds what.

The protocol (records, accounting, validation) is sans-IO in :mod:`udskit.proto.shm`; this
module does the system side, and the channel only calls into it:

* our pool: ``memfd_create(MFD_ALLOW_SEALING)``, sized once, sealed with F_SEAL_SHRINK,
  F_SEAL_GROW and F_SEAL_SEAL before the peer ever sees it, mapped read-write by us;
* the peer's pool: checked before it is mapped (a regular shmem file, F_GET_SEALS has
  SHRINK and GROW, fstat size equal to the size announced), then mapped *read-only*; the
  descriptor is closed at once, on every path. A memfd that could shrink would let the peer
  turn our reads into SIGBUS; a sealed one cannot change size under us.

Views. A received message is handed out as a read-only memoryview of a ctypes array laid
over the mapping (``(c_char * n).from_address``). Every view derived from it (slices,
``numpy.frombuffer``) keeps that array alive, so the array's death -- seen by a weak
reference -- is the exact moment nobody can read the slot any more: only then is the slot
released to the sender. (Python 3.11 has no hook on ``memoryview.release()`` itself; PEP
688's ``__release_buffer__`` came in 3.12.) A mapping is unmapped only when its channel is
closed *and* no view into it is alive, so a view never outlives its memory.
"""

from __future__ import annotations

import _thread
import ctypes
import fcntl
import logging
import mmap
import os
import stat
import threading
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

from .ancillary import close_fds
from .errors import ConnectionClosed, ProtocolError, Timeout, UdsError
from .freshbytes import FRESH_MIN, copied
from .proto.shm import (
    ATTACH,
    DEFAULT_POOL,
    MAX_POOL,
    OFFER,
    SLOT,
    Ledger,
    Pool,
    check_record,
    decode_record,
)

log = logging.getLogger("udskit")

__all__ = ["Lease", "Mapping", "SharedMemory", "create_pool", "map_peer_pool"]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

#: madvise() advice (Linux): fault a whole range in with one call (5.14+).
_MADV_POPULATE_WRITE: Final = 23
_PAGE: Final = mmap.PAGESIZE

#: Seals on our pool: its size is fixed for good (no SIGBUS for the peer, no growth behind
#: the accounting), and no one may add or remove seals later.
POOL_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

#: Seals a peer's pool must carry before we map it: the two that fix its size.
REQUIRED_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW

#: The memfd's name, as /proc/PID/maps and fd listings show it.
POOL_NAME: Final = "udskit-pool"


def check_loan_size(size: object, max_message: int) -> int:
    """``loan(size)``'s size: whole bytes, from 1 to the channel's max_frame."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= max_message:
        raise ValueError(
            f"loan: size must be from 1 to max_frame ({max_message}) bytes, not {size!r}"
        )
    return size


class _Offering(Protocol):
    def _offer(self) -> None: ...
    def close(self) -> None: ...


def offered(channel: _Offering, where: object) -> bool:
    """Send the OFFER record on a channel a listener accepted from a client that opted in;
    False (the channel closed) if the client is gone already."""
    try:
        channel._offer()
    except UdsError as exc:
        log.info("%s: client left before the shared-memory offer: %s", where, exc)
        channel.close()
        return False
    return True


#: The weak references that watch the arrays under live views (``Mapping.view``), by id: one
#: is called back only while it is alive itself, so each is held here until it fires.
#: (``weakref.finalize`` does the same, at several times the cost per message.)
_WATCHES: Final[dict[int, weakref.ref[ctypes.Array[ctypes.c_char]]]] = {}


class Mapping:
    """One mapped pool. ``close()`` unmaps it once no view into it is alive."""

    __slots__ = (
        "__weakref__",
        "_copied",
        "_live",
        "_lock",
        "address",
        "closed",
        "size",
        "where",
        "writable",
    )

    def __init__(self, fd: int, size: int, *, writable: bool, where: str) -> None:
        """``where``: the channel, as its errors name it."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        address = _mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            error = ctypes.get_errno()
            raise OSError(error, f"mmap of a shared-memory pool failed: {os.strerror(error)}")
        self.address: int = address
        self.size = size
        self.writable = writable
        self.where = where
        self.closed = False
        self._live = 0  # views alive, and copies under way: unmapping waits for them
        #: Our pool, one byte a page: 1 where a copy has gone (see ``_populate``).
        self._copied = bytearray(-(-size // _PAGE) if writable else 0)
        # Reentrant: a view's finalizer may run (a garbage collection) while this thread
        # holds the lock.
        self._lock = threading.RLock()

    def view(self, offset: int, length: int, gone: Callable[[], None] | None = None) -> memoryview:
        """A memoryview of ``length`` bytes at ``offset`` (writable only on our own pool);
        ``gone`` runs once the last view derived from it is gone."""
        self._enter()
        array = (ctypes.c_char * length).from_address(self.address + offset)
        watch = weakref.ref(array, partial(self._dead, gone))
        _WATCHES[id(watch)] = watch
        view = memoryview(array).cast("B")
        return view if self.writable else view.toreadonly()

    def _enter(self) -> None:
        """One more user of the mapping (a view, a copy): it stays mapped until ``_leave``."""
        with self._lock:
            if self.closed:
                raise ConnectionClosed(
                    f"{self.where}: the channel was closed, and its shared-memory pool with it"
                )
            self._live += 1

    def _leave(self) -> None:
        with self._lock:
            self._live -= 1
            unmap = self.closed and self._live == 0
        if unmap:
            self._unmap()

    def _dead(
        self, gone: Callable[[], None] | None, watch: weakref.ref[ctypes.Array[ctypes.c_char]]
    ) -> None:
        del _WATCHES[id(watch)]
        self._leave()
        if gone is not None:
            gone()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Copy ``data`` (bytes, or a byte view) into our pool at ``offset``: one memcpy.
        ctypes.memmove where it can read the source in place (bytes, a writable buffer):
        about twice as fast as a memoryview slice assignment, measured at 1 MiB."""
        size = len(data)
        target = self.address + offset
        self._enter()  # a close() in another thread leaves the memory mapped until we are done
        try:
            first, end = offset // _PAGE, -(-(offset + size) // _PAGE)
            if self._copied.find(0, first, end) >= 0:
                self._populate(first, end)
            if type(data) is bytes:
                ctypes.memmove(target, data, size)
            elif isinstance(data, memoryview) and not data.readonly and data.contiguous:
                ctypes.memmove(target, (ctypes.c_char * size).from_buffer(data), size)
            else:
                memoryview((ctypes.c_char * size).from_address(target)).cast("B")[:] = data
        finally:
            self._leave()

    def _populate(self, first: int, end: int) -> None:
        """Fault in pages ``first`` to ``end`` of our pool, about to be copied into, some
        never copied into before: in one call, about twice as fast as a page fault per
        4 KiB as the copy writes them (measured at 256 MiB on shmem; the kernel zeroes new
        pages either way, and passes over those already in). Only pages about to be
        written are touched, so the pool still costs memory only as far as messages have
        filled it. A loan is left to fault as the program writes it, which may not be all
        of it; a copy into its pages later is one more call here."""
        _madvise(self.address + first * _PAGE, (end - first) * _PAGE, _MADV_POPULATE_WRITE)
        self._copied[first:end] = b"\x01" * (end - first)  # advice only: else the copy faults

    def read(self, offset: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``offset``, as bytes."""
        self._enter()
        try:
            source = self.address + offset
            data = copied(source, length) if length >= FRESH_MIN else None
            if data is None:
                return bytes(memoryview((ctypes.c_char * length).from_address(source)).cast("B"))
            return data
        finally:
            self._leave()

    def close(self) -> None:
        """Unmap now, or when the last view into the pool is gone."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            unmap = self._live == 0
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        _munmap(self.address, self.size)


def create_pool(size: int, where: str) -> tuple[int, Mapping]:
    """A new sealed memfd of ``size`` bytes and our read-write mapping of it (for the
    channel ``where``). The caller owns the descriptor (it goes to the peer once, then is
    closed)."""
    fd = os.memfd_create(POOL_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, POOL_SEALS)
        return fd, Mapping(fd, size, writable=True, where=where)
    except BaseException:
        os.close(fd)
        raise


def map_peer_pool(fd: int, size: int, where: str) -> Mapping:
    """Check the peer's pool descriptor and map it read-only (for the channel ``where``);
    ``fd`` is closed on every path. ProtocolError says what is wrong with it."""
    try:
        if not 0 < size <= MAX_POOL:
            raise ProtocolError(
                f"peer offered a shared-memory pool of {size} bytes (at most {MAX_POOL})"
            )
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProtocolError("peer's shared-memory pool is not a memfd (not a regular file)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ProtocolError(
                "peer's shared-memory pool is not a memfd (it cannot carry seals)"
            ) from None
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise ProtocolError(
                "peer's shared-memory pool is not sealed against shrinking and growing, so it "
                "could change size under us; refusing to map it"
            )
        if info.st_size != size:
            raise ProtocolError(
                f"peer's shared-memory pool has {info.st_size} bytes, not the {size} announced"
            )
        try:
            return Mapping(fd, size, writable=False, where=where)
        except OSError as exc:
            # The peer chose the file: a hugetlbfs memfd with no huge pages to back it
            # passes every check above and fails here (ENOMEM), as can one beyond our
            # address-space limit. Either way no message of that pool can be read.
            raise ProtocolError(
                f"peer's shared-memory pool of {size} bytes cannot be mapped here: "
                f"{os.strerror(exc.errno or 0)}"
            ) from exc
    finally:
        os.close(fd)


class Lease:
    """A message that arrived in the peer's pool: ``length`` bytes at ``offset``, ours
    until released."""

    __slots__ = ("length", "offset")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length


class SharedMemory:
    """One channel's shared-memory state: our pool (sending), the peer's (receiving), the
    releases we owe, and the messages read ahead while a sender waited for pool space.

    ``lock`` guards all of it; the channel's locks order I/O around it.

    A view's end is seen by a weak-reference callback, which may run at any moment: in any
    thread, and in the middle of this very object's work when a garbage collection starts
    there. So a callback never changes the pool or the ledger itself: it queues the offset
    (``_loans_gone``, ``_views_gone``) and applies the queue (``_settle``) only if its
    thread is not inside the lock already; otherwise the lock does, as that thread leaves
    it (see ``_Lock``).
    """

    __slots__ = (
        "__weakref__",
        "_fd",
        "_loans",
        "_loans_gone",
        "_mine",
        "_space",
        "_theirs",
        "_unsent",
        "_views_gone",
        "_waiting",
        "arrived",
        "arrived_bytes",
        "attached",
        "closed",
        "eof",
        "ledger",
        "lock",
        "max_frame",
        "notify",
        "pending",
        "pool",
        "pool_size",
        "ready",
        "where",
    )

    def __init__(self, pool_size: int, max_frame: int, *, peer_opted: bool, where: str) -> None:
        """``where``: the channel, as its errors name it."""
        self.pool_size = pool_size
        self.where = where
        self.max_frame = max_frame
        #: The peer opted in: large sends may use our pool.
        self.ready = peer_opted
        self.pool: Pool | None = None
        self._mine: Mapping | None = None
        self._fd = -1  # our memfd until it has gone to the peer
        self.attached = False
        self.closed = False
        self.ledger: Ledger | None = None
        self._theirs: Mapping | None = None
        #: (message or Lease, fds) read ahead of recv(), in order
        self.arrived: deque[tuple[bytes | Lease, list[int]]] = deque()
        self.arrived_bytes = 0  # of the messages in ``arrived`` that are bytes
        self.eof = False
        #: offsets of the peer's slots we are done with, not yet sent as RELEASE
        self.pending: deque[int] = deque()
        self._loans_gone: deque[int] = deque()  # loans whose last view is gone, to settle
        self._views_gone: deque[int] = deque()  # peer slots whose last view is gone, to settle
        #: Guards all of it (see the class's doc).
        self.lock = _Lock((self._loans_gone, self._views_gone), self._left_lock)
        self._space = threading.Condition(self.lock)  # signalled as pool space comes free
        self._waiting = 0  # threads in wait_for_space()
        self._loans: dict[int, tuple[memoryview, int]] = {}
        self._unsent: set[int] = set()  # offsets of loans not (yet) sent
        #: called (any thread) when a release is pending: the channel tries to send it
        self.notify: Callable[[], None] = _nothing

    def tie_to(self, channel: object, release_soon: Callable[[], None]) -> None:
        """Serve ``channel``: call its ``release_soon`` (a bound method) when a release is
        owed, and close when it is dropped without ``close()`` (unmapping the pools once
        no view into them lives). Neither holds the channel alive."""
        self.notify = _weak_call(release_soon)
        weakref.finalize(channel, self.close).atexit = False

    # -- sending side ---------------------------------------------------------------------
    def usable_for(self, length: int) -> bool:
        """Whether a message of ``length`` bytes can go through our pool."""
        return self.ready and 0 < length <= self.max_frame and length <= self.pool_size

    def ensure_pool(self) -> None:
        """Create our pool (memfd, seals, mapping) if it does not exist yet."""
        if self._mine is None:
            self._fd, self._mine = create_pool(self.pool_size, self.where)
            self.pool = Pool(self.pool_size)

    def open_pool(self) -> int:
        """Create our pool on first use. The first call returns the descriptor to send with
        ATTACH (then ``pool_sent``, or ``attach_failed`` if nothing went out); later calls,
        -1: the peer has it, or it is on its way."""
        self.ensure_pool()
        if self.attached:
            return -1
        self.attached = True
        return self._fd

    def pool_sent(self) -> None:
        """ATTACH went out: our copy of the descriptor is no longer needed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def attach_failed(self) -> None:
        """ATTACH could not be sent (nothing of it went out): the next large send tries
        again."""
        self.attached = False

    def lend(self, length: int) -> int | None:
        """An offset for ``length`` bytes in our pool, or None while it is too full."""
        assert self.pool is not None
        with self.lock:
            if self._loans_gone:
                self._settle()
            return self.pool.allocate(length)

    @property
    def lending(self) -> bool:
        """Whether loans of ours are out, unsent: their space may come free here, with no
        release from the peer (a sender waiting for room must look again now and then)."""
        return bool(self._unsent or self._loans_gone)

    def wait_for_space(self, timeout: float) -> None:
        """Wait until part of our pool comes free (or the pool closes), ``timeout`` at most."""
        with self.lock:
            self._waiting += 1
            try:
                self._space.wait(timeout)
            finally:
                self._waiting -= 1

    def _freed(self) -> None:
        """Wake the threads waiting for space (caller holds the lock)."""
        if self._waiting:
            self._space.notify_all()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert self._mine is not None
        self._mine.write(offset, data)

    def loan(self, offset: int, length: int) -> memoryview:
        """A writable view of a lent extent, remembered so that ``send`` knows it."""
        assert self._mine is not None
        self._unsent.add(offset)
        view = self._mine.view(offset, length, lambda: self._gone(self._loans_gone, offset))
        self._loans[id(view)] = (view, offset)
        return view

    def _gone(self, queue: deque[int], offset: int) -> None:
        """A view's weak-reference callback (any thread, any moment): queue ``offset`` and,
        unless this thread is inside the lock already, settle (see the class's doc)."""
        queue.append(offset)
        if not self.lock._is_owned():
            self._left_lock()

    def _left_lock(self) -> None:
        """Settle what views' ends queued, and send the releases owed (no lock held)."""
        with self.lock:
            self._settle()
        if self.pending:
            self.notify()

    def _settle(self) -> None:
        """Apply what views' callbacks queued (caller holds the lock): a loan given up
        unsent frees its extent (and is forgotten); a released view of the peer's message
        frees its slot in the ledger, and a RELEASE is owed."""
        while self._loans_gone:
            offset = self._loans_gone.popleft()
            if offset not in self._unsent:
                continue  # it was sent: the peer releases it
            self._unsent.discard(offset)
            for key, (_, lent) in list(self._loans.items()):
                if lent == offset:
                    del self._loans[key]
            if self.pool is not None and offset in self.pool.lent:
                self.pool.release(offset)
                self._freed()
        while self._views_gone:
            offset = self._views_gone.popleft()
            if self.ledger is not None and offset in self.ledger.held:
                self.ledger.release(offset)
                self.pending.append(offset)

    def loaned(self, data: object) -> int | None:
        """The offset of ``data`` if it is one of our loans (still unsent), else None."""
        entry = self._loans.get(id(data))
        if entry is None or entry[0] is not data:
            return None
        return entry[1]

    def hand_over(self, view: memoryview) -> None:
        """``view`` (a loan) is being sent: the sender gives it up. ValueError if something
        made from it is still alive, since that could write to the receiver's message: an
        export of the loan itself (a PickleBuffer) leaves the loan usable (delete the export,
        send again); views made from it (slices, numpy.frombuffer arrays: numpy takes a view
        of its own) make the loan unusable, and its space returns when they are gone."""
        entry = self._loans.get(id(view))
        if entry is None:  # another thread's send() took it since ``loaned``
            raise ValueError("send(): the loaned buffer was sent already; take a new loan")
        _, offset = entry
        array = weakref.ref(view.obj)
        with self.lock:
            self._unsent.discard(offset)  # from here, the array's death does not free it
        try:
            view.release()
        except BufferError:
            with self.lock:
                self._unsent.add(offset)
            raise ValueError(
                "send(): the loaned buffer is still in use (something holds an export of it); "
                "delete that first, since after send() the buffer belongs to the receiver"
            ) from None
        # pop: a bad record read meanwhile by another thread may have closed us (and
        # forgotten the loans): the send then fails on the socket, closed after it
        self._loans.pop(id(view), None)
        with self.lock:
            alive = array() is not None
            if alive:
                self._unsent.add(offset)
        if alive:
            raise ValueError(
                "send(): views or arrays made from the loaned buffer (slices, numpy.frombuffer) "
                "are still alive and could change it after sending; it was not sent and is "
                "given up (its space returns when they are gone): take a new loan, and delete "
                "what you made from it before send()"
            )

    def give_back(self, offset: int) -> None:
        """An extent we lent ourselves but never sent: free again."""
        self.peer_released(offset)

    def peer_released(self, offset: int) -> None:
        """A RELEASE arrived: the extent is free again. ProtocolError if it was not lent
        to the peer (a loan not sent is not)."""
        with self.lock:
            if self.pool is None:
                raise ProtocolError("peer released a slot of a pool we never sent")
            if offset in self._unsent:
                # A loan of ours the peer never saw: freeing it would let our next message
                # be written over what the program is still filling.
                raise ProtocolError(
                    f"peer released offset {offset} of our shared-memory pool, which is not lent"
                )
            self.pool.release(offset)
            self._freed()

    # -- receiving side -------------------------------------------------------------------
    def on_record(self, body: bytes, fds: list[int]) -> Lease | None:
        """Act on one record from the peer: the Lease of a message it put in its pool
        (SLOT), else None. A bad record is a ProtocolError (its descriptors closed)."""
        try:
            record = decode_record(body)
            check_record(record, len(fds), peer_opted=self.ready)
            if record.kind == ATTACH:
                self.attach_peer(fds.pop(), record.first)
            elif record.kind == OFFER:
                self.ready = True
            elif record.kind == SLOT:
                return self.slot(record.first, record.second)
            else:
                self.peer_released(record.first)
        except UdsError:
            close_fds(fds)
            raise
        return None

    def attach_peer(self, fd: int, size: int) -> None:
        """The peer's ATTACH: check and map its pool (``fd`` is consumed).

        A pool larger than ours (or than DEFAULT_POOL, if ours is smaller) is refused: what
        we keep for the messages held in it grows with its size (a 1-byte message a page),
        and a sparse memfd of gigabytes costs the peer nothing."""
        if self._theirs is not None:
            os.close(fd)
            raise ProtocolError("peer attached a second shared-memory pool")
        limit = max(self.pool_size, DEFAULT_POOL)
        if size > limit:
            os.close(fd)
            raise ProtocolError(
                f"peer offered a shared-memory pool of {size} bytes; this side takes at most "
                f"{limit} (its own shared_memory= size, or the default)"
            )
        with self.lock:  # close() in another thread either comes first, or unmaps this
            if self.closed:
                os.close(fd)  # a reader that outlived close(): nothing would unmap it
                raise ConnectionClosed(
                    f"{self.where}: the channel was closed while its peer's pool arrived"
                )
            self._theirs = map_peer_pool(fd, size, self.where)
            self.ledger = Ledger(size, self.max_frame)

    def slot(self, offset: int, length: int) -> Lease:
        """A SLOT from the peer, checked against its pool and what we hold."""
        if self.ledger is None:
            raise ProtocolError("peer announced a shared-memory message before its pool")
        with self.lock:
            self.ledger.accept(offset, length)
        return Lease(offset, length)

    def view(self, lease: Lease) -> memoryview:
        """The read-only view of a leased message; the slot is released when the last
        view derived from it is gone."""
        assert self._theirs is not None
        offset = lease.offset
        return self._theirs.view(offset, lease.length, lambda: self._gone(self._views_gone, offset))

    def copy_out(self, lease: Lease) -> bytes:
        """The message as bytes (one copy); the slot is released at once."""
        assert self._theirs is not None
        try:
            return self._theirs.read(lease.offset, lease.length)
        finally:
            self.release(lease.offset)

    def release(self, offset: int) -> None:
        """We are done with the peer's slot at ``offset``: owe a RELEASE."""
        with self.lock:
            if self.ledger is not None and offset in self.ledger.held:
                self.ledger.release(offset)
                self.pending.append(offset)
        self.notify()

    def owes(self) -> bool:
        """Whether RELEASEs are owed to the peer (or views' ends wait to be settled)."""
        return bool(self.pending or self._views_gone)

    def take_pending(self) -> list[int]:
        """The offsets of the RELEASEs owed, now taken to be sent."""
        with self.lock:
            if self._views_gone:
                self._settle()
            offsets = list(self.pending)
            self.pending.clear()
        return offsets

    def stayed_full(self, where: str, timeout: float | None, call: str) -> Timeout:
        """What ``call`` ("send", "loan") raises when our pool stayed full for ``timeout``
        seconds: who holds the space, the receiver or loans of ours not sent yet."""
        with self.lock:
            if self._loans_gone:
                self._settle()
            lent = {} if self.pool is None else self.pool.lent
            unsent = sum(lent.get(offset, 0) for offset in self._unsent)
            held = sum(lent.values()) - unsent
        loans = f", and {unsent} bytes are in loans of ours not sent yet" if unsent else ""
        return Timeout(
            f"{where}: the shared-memory pool stayed full for {timeout} s (the receiver holds "
            f"{held} bytes unreleased{loans}); {call} timed out"
        )

    # -- both -----------------------------------------------------------------------------
    @property
    def in_use(self) -> int:
        """Bytes of our pool lent to the peer (or to loans not sent yet)."""
        with self.lock:
            if self._loans_gone:
                self._settle()
            return 0 if self.pool is None else self.pool.in_use

    def close(self) -> None:
        """Release everything: descriptors now, mappings once no view into them is alive."""
        with self.lock:
            self.ready = False
            self.closed = True
            self._freed()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._loans.clear()
        self._loans_gone.clear()
        self._views_gone.clear()
        for _, fds in self.arrived:
            close_fds(fds)
        self.arrived.clear()
        self.arrived_bytes = 0
        self.pending.clear()
        self.notify = _nothing
        for mapping in (self._mine, self._theirs):
            if mapping is not None:
                mapping.close()


class _Lock(_thread.RLock):  # type: ignore[misc]
    """SharedMemory's lock: reentrant, and as a thread leaves it (its outermost ``with``),
    ``settle`` runs if views' ends were queued meanwhile: their callbacks found the lock
    held by that very thread (a garbage collection there) and could not act."""

    __slots__ = ("_queues", "_settle")

    def __init__(self, queues: tuple[deque[int], ...], settle: Callable[[], None]) -> None:
        super().__init__()
        self._queues = queues
        self._settle = settle

    if TYPE_CHECKING:

        def _is_owned(self) -> bool: ...  # _thread.RLock's, as threading.Condition uses it

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        loans, views = self._queues
        if (loans or views) and not self._is_owned():
            self._settle()


def _nothing() -> None:
    return None


def _weak_call(method: Callable[[], None]) -> Callable[[], None]:
    """A callable that calls the bound ``method`` while its object is alive, and does
    nothing after."""
    owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
    function = method.__func__  # type: ignore[attr-defined]

    def call() -> None:
        alive = owner()
        if alive is not None:
            function(alive)

    return call
