"""Userspace NBD server (trio): several named exports, memory and file backends.

Counterpart: nbdkit (``memory`` plugin) and nbd-server / qemu-nbd (a raw file),
speaking the protocol of NetworkBlockDevice/nbd ``doc/proto.md``.  The wire
format and negotiation live in :mod:`nbdproto`; this module is the
I/O shell and the block semantics.

Behaviour (see docs/NBD.md for the full table):

* fixed newstyle handshake only; ``LIST``, ``INFO``, ``GO``,
  ``EXPORT_NAME``, ``ABORT``, ``STRUCTURED_REPLY``; everything else
  ``ERR_UNSUP`` (``STARTTLS``: ``ERR_POLICY``);
* READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (``NO_HOLE``), CACHE, DISC and
  the FUA flag; errors as nbdkit does them (``EINVAL`` bad range,
  ``ENOSPC`` write past the end, ``EPERM`` read-only, ``EINVAL`` for unknown
  commands/flags and for READ/WRITE over the maximum request size, the
  WRITE's payload being drained first);
* the memory backend is sparse (a dict of 64 KiB chunks, shared by all
  connections to the export); the file backend is a sparse file, with a real
  ``fsync`` on FLUSH and ``fdatasync`` after a FUA write;
* per connection, requests whose work is pure memory are executed inline by
  the reader (no task spawn), and their replies are batched into one
  scatter-gather ``sendmsg`` per received buffer; large READ replies are
  views of the memory backend's chunks, not copies (they are sent before
  any later request that could change those chunks runs); requests that
  block (file FLUSH, FUA, large file I/O, trim/zero on files) run in worker
  threads, at most ``max_inflight_per_client`` at once, and their replies
  may overtake earlier ones (out of order, matched by cookie; one reply's
  header and payload always go out together);
* graceful shutdown (:meth:`NBDServer.request_shutdown`): stop accepting,
  let in-flight requests finish, answer new requests with ``ESHUTDOWN`` and
  new options with ``ERR_SHUTDOWN``, close remaining connections after a
  grace period;
* limits: at most ``max_clients`` clients at once; a client beyond the cap
  gets the greeting, then ``NBD_REP_ERR_POLICY`` (with a message) to every
  option but ABORT, and is closed if it sends ``NBD_OPT_EXPORT_NAME`` (which
  cannot carry an error); an optional ``idle_timeout`` closes a connection
  that sends nothing for that long with no request in flight;
* robustness: handshake timeout, timeout on a half-received request, cap on
  option size and count, bad request magic closes the connection; any
  unexpected exception in one connection closes that connection only.

Simplified: no TLS, no meta contexts / BLOCK_STATUS, no extended headers, no
per-export access control.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import attrs
import structlog
import trio

import nbdproto as P
from nbdproto import (
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBD_SIMPLE_REPLY_MAGIC,
    NEED_DATA,
)

log = structlog.get_logger("userspace.nbd.server")

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST = 32 * MiB
DEFAULT_MAX_INFLIGHT = 64
CHUNK = 65536
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_VIEW = memoryview(_ZERO_CHUNK)
_OUT_HIGH = 1024 * 1024  # send queued replies once they reach this size
_VIEW_MIN = 65536  # READs this large are sent from views of the backend's buffers, not copies
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_SEND_IOV = 1024  # buffers per sendmsg call (IOV_MAX on Linux)
_simple_pack = struct.Struct(">IIQ").pack
# Clients beyond max_clients that are being refused in the handshake at once; beyond
# this many more, a new connection is closed at once (the spec allows a hard close
# when a server believes it is under denial of service).
MAX_REFUSING = 64


# --------------------------------------------------------------------------
# Export specification
# --------------------------------------------------------------------------


def _check_backend(inst, attribute, value):
    if value not in ("memory", "file"):
        raise ValueError(f"backend must be 'memory' or 'file', not {value!r}")


def _check_size(inst, attribute, value):
    if not isinstance(value, int) or value < 0 or value >= 1 << 63:
        raise ValueError(f"export size must be an integer in [0, 2**63), not {value!r}")


@attrs.frozen
class ExportSpec:
    """One export: a name, a size in bytes, and where its bytes live."""

    name: str
    size: int = attrs.field(validator=_check_size)
    backend: str = attrs.field(default="memory", validator=_check_backend)
    path: str | None = None
    read_only: bool = False
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if len(self.name.encode()) > P.NBD_MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")
        if "\0" in self.name:
            raise ValueError("export name contains NUL")
        if self.backend == "file" and not self.path:
            raise ValueError(f"export {self.name!r}: the file backend needs a path")
        if self.backend == "memory" and self.path:
            raise ValueError(f"export {self.name!r}: a path was given for the memory backend")


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


class MemoryBackend:
    """Sparse memory: 64 KiB chunks (bytearrays) in a dict; absent chunks read
    as zeroes.  Thread-safe for the server's use (connection threads): a
    lock serialises writers; small reads copy under the GIL, large reads
    hand out views that the kernel copies from while the GIL is released, so
    a READ that overlaps a concurrent WRITE from another connection may see
    a mix of old and new bytes (as with a disk, overlapping requests in
    flight at once have no defined order)."""

    needs_thread = False

    def __init__(self, size: int) -> None:
        self.size = size
        # chunk index -> bytearray, or a writable memoryview of CHUNK bytes
        self.chunks: dict[int, bytearray | memoryview] = {}
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int):
        """A copy of ``length`` bytes at ``offset`` (for small reads), or None
        when the whole range was never written (it reads as zeroes)."""
        idx, off = divmod(offset, CHUNK)
        if off + length <= CHUNK:
            c = self.chunks.get(idx)
            return None if c is None else bytes(c[off : off + length])
        parts = self.read_views(offset, length)
        return None if parts is None else b"".join(parts)

    def read_views(self, offset: int, length: int):
        """The bytes at ``offset`` as a list of buffers without copying them
        (views of the chunks, read-only zero views for absent chunks), or None
        when the whole range was never written.  The views see later writes:
        send them before executing a request that may change those chunks."""
        chunks = self.chunks
        parts = []
        hole = True
        end = offset + length
        while offset < end:
            idx, off = divmod(offset, CHUNK)
            n = min(CHUNK - off, end - offset)
            c = chunks.get(idx)
            if c is None:
                parts.append(_ZERO_VIEW if n == CHUNK else _ZERO_VIEW[:n])
            else:
                hole = False
                parts.append(memoryview(c) if n == CHUNK else memoryview(c)[off : off + n])
            offset += n
        return None if hole else parts

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        chunks = self.chunks
        length = len(data)
        idx, off = divmod(offset, CHUNK)
        with self.lock:
            if off + length <= CHUNK:
                c = chunks.get(idx)
                if c is None:
                    if length == CHUNK:
                        chunks[idx] = bytearray(data)
                        return
                    c = chunks[idx] = bytearray(CHUNK)
                c[off : off + length] = data
                return
            # A bytearray payload is taken over, not copied (the parser hands over
            # a private one for large WRITEs):
            # whole chunks become writable views into it instead of copies.
            own = isinstance(data, bytearray)
            with memoryview(data) as mv:
                pos = 0
                while pos < length:
                    idx, off = divmod(offset + pos, CHUNK)
                    n = min(CHUNK - off, length - pos)
                    if n == CHUNK:
                        chunks[idx] = mv[pos : pos + n] if own else bytearray(mv[pos : pos + n])
                    else:
                        c = chunks.get(idx)
                        if c is None:
                            c = chunks[idx] = bytearray(CHUNK)
                        c[off : off + n] = mv[pos : pos + n]
                    pos += n

    def _zero_range(self, offset: int, length: int) -> None:
        if length == 0:
            return
        chunks = self.chunks
        end = offset + length
        first = offset // CHUNK
        last = (end - 1) // CHUNK
        with self.lock:
            if last - first + 1 > len(chunks):
                # Sparse: iterate over existing chunks instead of the range.
                idxs = [i for i in chunks if first <= i <= last]
            else:
                idxs = [i for i in range(first, last + 1) if i in chunks]
            for i in idxs:
                cstart = i * CHUNK
                lo = max(offset, cstart) - cstart
                hi = min(end, cstart + CHUNK) - cstart
                if lo == 0 and hi == CHUNK:
                    del chunks[i]
                else:
                    chunks[i][lo:hi] = bytes(hi - lo)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._zero_range(offset, length)

    def zero(self, offset: int, length: int, no_hole: bool = False, fua: bool = False) -> None:
        # NO_HOLE only matters for allocation; reading back is zeroes either way.
        self._zero_range(offset, length)

    def flush(self) -> None:
        pass

    def inline_ok(self, cmd: int, flags: int, length: int) -> bool:
        return True

    def close(self) -> None:
        pass


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return rc == 0
    except (OSError, AttributeError):
        return False


class FileBackend:
    """A sparse file.  FLUSH → fsync; FUA → fdatasync after the write.
    TRIM and WRITE_ZEROES punch holes (zeroes are written if that fails or
    NO_HOLE is set)."""

    needs_thread = True
    INLINE_MAX = 256 * 1024

    def __init__(self, path: str, size: int, read_only: bool = False) -> None:
        self.size = size
        self.path = path
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
        self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        if not read_only and os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got) if data else b""
            if not more:
                parts.append(bytes(length - got))  # beyond EOF reads as zeroes
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_views(self, offset: int, length: int) -> list:
        return [self.pread(offset, length)]

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(self.fd, mv, offset)
            mv = mv[n:]
            offset += n
        if fua:
            os.fdatasync(self.fd)

    def _write_zeroes(self, offset: int, length: int) -> None:
        block = bytes(min(length, MiB))
        while length:
            n = min(length, len(block))
            self.write(offset, block[:n])
            offset += n
            length -= n

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if length and not _punch_hole(self.fd, offset, length):
            self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, no_hole: bool = False, fua: bool = False) -> None:
        if length and (no_hole or not _punch_hole(self.fd, offset, length)):
            self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fsync(self.fd)

    def inline_ok(self, cmd: int, flags: int, length: int) -> bool:
        return (
            (cmd == NBD_CMD_READ or cmd == NBD_CMD_WRITE)
            and not flags & NBD_CMD_FLAG_FUA
            and length <= self.INLINE_MAX
        )

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _open_backend(spec: ExportSpec):
    if spec.backend == "memory":
        return MemoryBackend(spec.size)
    assert spec.path is not None
    return FileBackend(spec.path, spec.size, read_only=spec.read_only)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

_RW_FLAGS = (
    P.NBD_FLAG_HAS_FLAGS
    | P.NBD_FLAG_SEND_FLUSH
    | P.NBD_FLAG_SEND_FUA
    | P.NBD_FLAG_SEND_TRIM
    | P.NBD_FLAG_SEND_WRITE_ZEROES
    | P.NBD_FLAG_SEND_DF
    | P.NBD_FLAG_CAN_MULTI_CONN
    | P.NBD_FLAG_SEND_CACHE
)
_RO_FLAGS = (
    P.NBD_FLAG_HAS_FLAGS
    | P.NBD_FLAG_READ_ONLY
    | P.NBD_FLAG_SEND_FLUSH
    | P.NBD_FLAG_SEND_DF
    | P.NBD_FLAG_CAN_MULTI_CONN
    | P.NBD_FLAG_SEND_CACHE
)

# Commands that may change what a queued view of the backend shows.
_MUTATING = frozenset((NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES))

# Allowed command flags per command (unknown or inapplicable → EINVAL).
_ALLOWED_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
}


class _Export:
    __slots__ = ("spec", "backend", "server_export", "size", "read_only", "inline_max", "write")

    def __init__(self, spec: ExportSpec, backend, max_request: int) -> None:
        self.spec = spec
        self.backend = backend
        self.size = spec.size
        self.read_only = spec.read_only
        # The hot path: a READ or WRITE without flags, in range and at most this
        # long, is answered by the connection's own thread (backend.inline_ok).
        self.inline_max = min(max_request, getattr(backend, "INLINE_MAX", max_request))
        self.write = backend.write
        self.server_export = P.ServerExport(
            name=spec.name,
            size=spec.size,
            flags=_RO_FLAGS if spec.read_only else _RW_FLAGS,
            description=spec.description,
            min_block=1,
            preferred_block=4096,
            max_block=max_request,
        )


def _send_parts(sendmsg, parts: list, size: int = -1) -> None:
    """Send every buffer of ``parts``, in order, with scatter-gather
    ``sendmsg`` calls of at most ``_SEND_IOV`` buffers each, resuming after
    partial sends.  ``sendmsg`` is a blocking socket's method; the caller
    holds the connection's send lock.  One call per batch of replies: cutting
    a 1 MiB batch into 256 KiB calls cost a third of the 1 MiB READ
    throughput (more sleeps in the send path, docs/PERFORMANCE.md).
    ``size``, when the caller knows it, is the bytes in ``parts``: then the
    common case (one call sends it all) costs a single ``sendmsg``."""
    if 0 <= size and len(parts) <= _SEND_IOV:
        sent = sendmsg(parts)
        if sent == size:
            return
        k = 0  # partial send: skip what went out, then the general case
        while k < len(parts) and sent >= len(parts[k]):
            sent -= len(parts[k])
            k += 1
        parts = parts[k:]
        if not parts:
            return
        if sent:
            parts[0] = memoryview(parts[0]).cast("B")[sent:]
    for i in range(0, len(parts), _SEND_IOV):
        batch = parts[i : i + _SEND_IOV]
        size = sum(map(len, batch))
        while size:
            sent = sendmsg(batch)
            size -= sent
            if not size:
                break
            k = 0
            while sent >= len(batch[k]):
                sent -= len(batch[k])
                k += 1
            batch = batch[k:]
            batch[0] = memoryview(batch[0]).cast("B")[sent:]


class _StreamIO:
    """Transmission I/O over any trio Stream (memory streams in tests, TLS...)."""

    def __init__(self, stream: trio.abc.Stream, receive_size: int) -> None:
        self.stream = stream
        self.receive_size = receive_size
        self.lock = trio.StrictFIFOLock()

    async def receive(self):
        return await self.stream.receive_some(self.receive_size)

    async def send(self, data) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    def close(self) -> None:
        pass


class _RawSocketIO:
    """Hot-path I/O on a TCP connection: non-blocking syscalls on a dup of the
    socket, parking in trio only when the kernel says EAGAIN.  One receive
    buffer is reused (``recv_into``); a reply batch goes out with one
    ``send``.  This saves the two scheduler yields per call that trio's
    ``SocketStream`` spends on checkpoints, which at queue depth 1 is most of
    a round trip.  Cancellation is still honoured at every wait, and a
    connection that always has data yields every few receives (fairness)."""

    def __init__(self, trio_sock, receive_size: int) -> None:
        self.sock = socket.socket(fileno=os.dup(trio_sock.fileno()))
        self.sock.setblocking(False)
        self.rbuf = bytearray(receive_size)
        self.rview = memoryview(self.rbuf)
        self.lock = trio.StrictFIFOLock()
        self._spins = 0

    async def receive(self):
        sock = self.sock
        while True:
            try:
                n = sock.recv_into(self.rbuf)
            except BlockingIOError:
                self._spins = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            self._spins += 1
            if self._spins >= 16:
                self._spins = 0
                # Yield for fairness, but never be cancelled here: the bytes are read.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return self.rview[:n]

    async def send(self, data) -> None:
        if not self.lock.locked():
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if n == len(data):
                return
            data = memoryview(data)[n:]
        async with self.lock:
            mv = memoryview(data)
            while mv:
                try:
                    n = self.sock.send(mv)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                mv = mv[n:]

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class _ConnClosed(Exception):
    pass


class _IdleTimeout(Exception):
    pass


class NBDServer:
    """The server.  ``await server.serve(host, port, task_status=...)`` runs
    until :meth:`request_shutdown` (graceful) or cancellation (abrupt)."""

    def __init__(
        self,
        exports: list[ExportSpec],
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_inflight_per_client: int = DEFAULT_MAX_INFLIGHT,
        max_clients: int = 1024,
        handshake_timeout: float = 10.0,
        request_timeout: float = 30.0,
        idle_timeout: float = 0.0,
        shutdown_grace: float = 2.0,
        receive_size: int = 256 * 1024,
        io_mode: str = "thread",
        busy_poll_us: int = 0,
    ) -> None:
        if not exports:
            raise ValueError("at least one export is needed")
        names = [e.name for e in exports]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate export names in {names}")
        if not 512 <= max_request <= 0xFFFFFFFF:
            raise ValueError("max_request must be between 512 bytes and 4 GiB - 1")
        if max_inflight_per_client < 1:
            raise ValueError("max_inflight_per_client must be at least 1")
        if not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be an integer of at least 1, not {max_clients!r}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, not {handshake_timeout!r}")
        if not idle_timeout >= 0:
            raise ValueError(f"idle_timeout must not be negative (0 = none), not {idle_timeout!r}")
        self.specs = list(exports)
        self.max_request = max_request
        self.max_inflight_per_client = max_inflight_per_client
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.shutdown_grace = shutdown_grace
        self.receive_size = receive_size
        if io_mode not in ("thread", "trio"):
            raise ValueError(f"io_mode must be 'thread' or 'trio', not {io_mode!r}")
        self.io_mode = io_mode
        if busy_poll_us < 0:
            raise ValueError("busy_poll_us must not be negative")
        self.busy_poll_us = busy_poll_us
        self._thread_limiter = trio.CapacityLimiter(max_clients + 1)
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nbd-io")
        self.port: int | None = None
        self.shutting_down = False
        self._exports: dict[str, _Export] = {}
        self._shutdown_event = trio.Event()
        self._connections = 0
        self._admitted = 0  # connections holding one of the max_clients slots
        self._refusing = 0  # connections beyond the cap, being refused in the handshake
        self._idle = trio.Event()
        self._idle.set()
        self._next_conn_id = 0
        self.stats = {
            "connections": 0,
            "requests": 0,
            "errors": 0,
            "protocol_errors": 0,
            "refused": 0,
            "idle_timeouts": 0,
        }

    @property
    def clients(self) -> int:
        """Connections holding one of the ``max_clients`` slots (refused ones do not)."""
        return self._admitted

    # -- lifecycle
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (call from the server's trio thread)."""
        self._shutdown_event.set()

    def open_exports(self) -> None:
        """Open every export's backend (idempotent). ``serve`` calls it; a caller that
        drives ``handle_stream`` itself (e.g. over an in-memory stream) calls it first."""
        for spec in self.specs:
            if spec.name not in self._exports:
                self._exports[spec.name] = _Export(spec, _open_backend(spec), self.max_request)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        self.open_exports()
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                accept_scope = trio.CancelScope()
                nursery.start_soon(self._accept_loop, listeners, nursery, accept_scope)
                log.info(
                    "nbd_server_listening",
                    host=host,
                    port=self.port,
                    exports=[
                        {"name": s.name, "size": s.size, "backend": s.backend, "ro": s.read_only}
                        for s in self.specs
                    ],
                    max_clients=self.max_clients,
                    idle_timeout_s=self.idle_timeout,
                    handshake_timeout_s=self.handshake_timeout,
                )
                task_status.started(self.port)
                await self._shutdown_event.wait()
                log.info("nbd_server_shutdown_begin", connections=self._connections)
                self.shutting_down = True
                accept_scope.cancel()
                with trio.move_on_after(self.shutdown_grace):
                    await self._idle.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._executor.shutdown(wait=True)
            for exp in self._exports.values():
                exp.backend.close()
            log.info("nbd_server_stopped", port=self.port, **self.stats)

    async def _accept_loop(self, listeners, nursery, scope: trio.CancelScope) -> None:
        with scope:
            try:
                async with trio.open_nursery() as inner:
                    for ln in listeners:
                        inner.start_soon(self._accept_one_listener, ln, nursery)
            finally:
                for ln in listeners:
                    with trio.CancelScope(shield=True):
                        await ln.aclose()

    async def _accept_one_listener(self, listener, nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning("nbd_accept_error", error=str(exc))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._handle_connection, stream)

    # -- one connection
    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        self._next_conn_id += 1
        cid = self._next_conn_id
        self._connections += 1
        self.stats["connections"] += 1
        self._idle = trio.Event() if self._connections == 1 else self._idle
        peer = None
        try:
            sock = getattr(stream, "socket", None)
            if sock is not None:
                try:
                    host, port = sock.getpeername()[:2]
                    peer = f"{host}:{port}"
                except OSError:
                    peer = None
            await self.handle_stream(stream, cid=cid, peer=peer)
        finally:
            self._connections -= 1
            if self._connections == 0:
                self._idle.set()

    async def handle_stream(self, stream: trio.abc.Stream, *, cid: int = 0, peer: str | None = None) -> None:
        """Serve one client on ``stream`` (any trio Stream), then close it."""
        clog = log.bind(conn=cid, peer=peer)
        reason = "eof"
        admitted = self._admitted < self.max_clients
        refusing = False
        if admitted:
            self._admitted += 1
        try:
            async with stream:
                if not admitted:
                    self.stats["refused"] += 1
                    if self._refusing >= MAX_REFUSING:
                        clog.warning(
                            "nbd_client_refused",
                            max_clients=self.max_clients,
                            how="closed at once: too many refusals in progress",
                        )
                        reason = "refused_max_clients"
                        return
                    refusing = True
                    self._refusing += 1
                    clog.warning(
                        "nbd_client_refused",
                        max_clients=self.max_clients,
                        how="NBD_REP_ERR_POLICY to every option; closed on NBD_OPT_EXPORT_NAME",
                    )
                done = await self._handshake(stream, clog, refuse=not admitted)
                if done is None:
                    reason = "refused_max_clients" if refusing else "handshake_ended"
                    return
                ev, leftover = done
                if isinstance(ev, P.HandshakeRefused):
                    clog.warning(
                        "nbd_client_refused_export_name",
                        max_clients=self.max_clients,
                        how="hard close (NBD_OPT_EXPORT_NAME cannot carry an error)",
                    )
                    reason = "refused_max_clients_export_name"
                    return
                exp = self._exports[ev.info.name]
                clog.info(
                    "nbd_client_connected",
                    export=ev.info.name,
                    structured=ev.structured_replies,
                    flags=hex(ev.info.flags),
                )
                reason = await self._transmission(stream, exp, ev.structured_replies, leftover, clog)
                if reason == "idle_timeout":
                    self.stats["idle_timeouts"] += 1
                    clog.info("nbd_client_idle_timeout", idle_timeout_s=self.idle_timeout)
        except P.ProtocolError as exc:
            self.stats["protocol_errors"] += 1
            reason = f"protocol_error: {exc}"
        except trio.TooSlowError:
            reason = "handshake_timeout"  # the transmission loops catch their own timeouts
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ConnClosed):
            reason = "connection_lost"
        except Exception as exc:  # never let one client take the server down
            clog.exception("nbd_connection_crashed")
            reason = f"internal_error: {exc!r}"
        finally:
            if admitted:
                self._admitted -= 1
            if refusing:
                self._refusing -= 1
            clog.info("nbd_client_closed", reason=reason)

    def refusal_message(self) -> str:
        """What a client beyond ``max_clients`` is told (NBD_REP_ERR_POLICY's message)."""
        n = self.max_clients
        return f"server is at its limit of {n} client{'s' if n != 1 else ''} at once; try again later"

    async def _handshake(self, stream, clog, refuse: bool = False):
        """Run the server handshake.  Returns None when it ended without a
        transmission (ABORT, EOF), else (HandshakeDone or HandshakeRefused,
        bytes received beyond it).  A client beyond the cap (``refuse``) goes
        through the same handshake with every option refused."""
        hs = P.ServerHandshake({name: e.server_export for name, e in self._exports.items()})
        if refuse:
            hs.refusal = self.refusal_message()
        with trio.fail_after(self.handshake_timeout):
            await stream.send_all(hs.greeting())
            while True:
                hs.shutting_down = self.shutting_down
                ev = hs.next_event()
                out = hs.data_to_send()
                if out:
                    await stream.send_all(out)
                if ev is NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return None
                    hs.receive_data(data)
                    continue
                if isinstance(ev, P.HandshakeAborted):
                    return None
                return ev, hs.trailing_data()

    async def _transmission(self, stream, exp: _Export, structured: bool, leftover: bytes, clog) -> str:
        parser = P.RequestParser(self.max_request)
        parser.receive_data(leftover)
        tsock = getattr(stream, "socket", None)
        is_tcp = tsock is not None and getattr(tsock, "type", None) == socket.SOCK_STREAM
        if is_tcp and self.io_mode == "thread":
            return await self._transmission_threaded(tsock, parser, exp, structured)
        if is_tcp:
            io = _RawSocketIO(tsock, self.receive_size)
        else:
            io = _StreamIO(stream, self.receive_size)
        try:
            return await self._transmission_loop(io, parser, exp, structured, clog)
        finally:
            io.close()

    async def _transmission_loop(self, io, parser, exp: _Export, structured: bool, clog) -> str:
        sem = trio.Semaphore(self.max_inflight_per_client)
        stats = self.stats
        idle = self.idle_timeout
        out: list = []
        queued = 0  # bytes in out
        views = False  # out holds views of backend buffers (a large READ)
        nreq = 0
        reason = "eof"

        send = io.send
        receive = io.receive

        async def flush_out() -> None:
            nonlocal out, queued, views
            if out:
                data = b"".join(out)
                out = []
                queued = 0
                views = False
                await send(data)

        async def worker(req: P.Request) -> None:
            try:
                buf: list = []
                await trio.to_thread.run_sync(self._execute, buf, req, exp, structured)
                await send(b"".join(buf))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                sem.release()

        async with trio.open_nursery() as nursery:
            try:
                while True:
                    disc = False
                    while True:
                        if queued >= _OUT_HIGH:
                            await flush_out()  # bound memory: a client may pipeline many big READs
                        req = parser.next_event()
                        if req is NEED_DATA:
                            break
                        nreq += 1
                        cmd = req.cmd
                        if cmd == NBD_CMD_DISC:
                            disc = True
                            break
                        if views and cmd in _MUTATING:
                            await flush_out()  # queued READ replies must not see this request
                        n = self._answer_inline(out, req, exp, structured)
                        if n >= 0:
                            queued += n
                            views = views or (cmd == NBD_CMD_READ and req.length >= _VIEW_MIN)
                            continue
                        # Blocking work: run in a thread, bounded per client.
                        try:
                            sem.acquire_nowait()
                        except trio.WouldBlock:
                            await flush_out()
                            await sem.acquire()
                        nursery.start_soon(worker, req)
                    await flush_out()
                    if disc:
                        reason = "disc"
                        break
                    if parser.partial:
                        with trio.fail_after(self.request_timeout):
                            data = await receive()
                    elif idle:
                        while True:
                            with trio.move_on_after(idle) as idle_scope:
                                data = await receive()  # cancel-safe: nothing is read when cancelled
                            if not idle_scope.cancelled_caught:
                                break
                            if sem.value == self.max_inflight_per_client:
                                raise _IdleTimeout  # nothing received, nothing in flight
                    else:
                        data = await receive()
                    if not data:
                        reason = "eof_partial_request" if parser.partial else "eof"
                        break
                    parser.receive_data(data)
            except P.ProtocolError as exc:
                self.stats["protocol_errors"] += 1
                reason = f"protocol_error: {exc}"
            except trio.TooSlowError:
                reason = "timeout_partial_request"
            except _IdleTimeout:
                reason = "idle_timeout"
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                reason = "connection_lost"
            finally:
                stats["requests"] += nreq
        return reason

    # -- transmission in a dedicated OS thread (io_mode="thread")
    async def _transmission_threaded(self, tsock, parser, exp: _Export, structured: bool) -> str:
        """Run the connection's transmission phase as a blocking loop in its
        own OS thread (like nbd-server's per-client process): the thread
        sleeps in ``recv`` and is woken directly by the kernel, which at
        queue depth 1 is about twice as fast as parking in trio's epoll loop.
        The trio task waits for the thread; cancellation (server stop) shuts
        the socket down, which ends the thread's ``recv``."""
        sock = socket.socket(fileno=os.dup(tsock.fileno()))
        sock.setblocking(True)
        finished = threading.Event()

        async def watcher() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished.is_set():
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher)
                try:
                    reason = await trio.to_thread.run_sync(
                        self._blocking_loop, sock, parser, exp, structured, limiter=self._thread_limiter
                    )
                finally:
                    finished.set()
                    nursery.cancel_scope.cancel()
        finally:
            sock.close()
        return reason

    def _blocking_loop(self, sock: socket.socket, parser, exp: _Export, structured: bool) -> str:
        """The transmission phase of one connection, in its own thread: receive
        into a reused buffer, answer every complete request in it (inline, or
        through the worker pool for blocking work), send the batch of replies
        with one scatter-gather ``sendmsg``, receive again."""
        stats = self.stats
        rbuf = bytearray(self.receive_size)
        rview = memoryview(rbuf)
        send_lock = threading.Lock()  # one reply's header and payload go out together
        inflight = threading.BoundedSemaphore(self.max_inflight_per_client)
        pending: list = []
        out: list = []
        queued = 0  # bytes in out
        views = False  # out holds views of backend buffers (a large READ)
        nreq = 0
        reason = "eof"
        sendmsg = sock.sendmsg
        recv_into = sock.recv_into
        timeout_set = False
        spin = self.busy_poll_us / 1e6
        monotonic = time.monotonic
        sched_yield = os.sched_yield
        idle_ms = max(1, round(self.idle_timeout * 1000)) if self.idle_timeout else 0
        if idle_ms:
            # The idle timeout waits in poll() rather than through a socket
            # timeout, which would also apply to the workers' sends.
            poller = select.poll()
            poller.register(sock, select.POLLIN)

        def worker(req: P.Request) -> None:
            try:
                buf: list = []
                self._execute(buf, req, exp, structured)
                with send_lock:
                    _send_parts(sendmsg, buf)
            except OSError:
                pass
            finally:
                inflight.release()

        try:
            while True:
                disc = False
                while True:
                    req = parser.next_event()
                    if req is NEED_DATA:
                        break
                    nreq += 1
                    cmd = req.cmd
                    if cmd == NBD_CMD_DISC:
                        disc = True
                        break
                    if views and cmd in _MUTATING:
                        # Queued READ replies are views of the backend: send
                        # them before this request may change what they show.
                        with send_lock:
                            _send_parts(sendmsg, out)
                        out = []
                        queued = 0
                        views = False
                    n = self._answer_inline(out, req, exp, structured)
                    if n >= 0:
                        queued += n
                        if cmd == NBD_CMD_READ and req.length >= _VIEW_MIN:
                            views = True
                        if queued >= _OUT_HIGH:
                            # Bound memory: a client may pipeline many big READs.
                            with send_lock:
                                _send_parts(sendmsg, out)
                            out = []
                            queued = 0
                            views = False
                        continue
                    if not inflight.acquire(blocking=False):
                        if out:
                            with send_lock:
                                _send_parts(sendmsg, out)
                            out = []
                            queued = 0
                            views = False
                        inflight.acquire()
                    pending.append(self._executor.submit(worker, req))
                if out:
                    with send_lock:
                        _send_parts(sendmsg, out, queued)
                    out = []
                    queued = 0
                    views = False
                if disc:
                    reason = "disc"
                    break
                if parser.partial:
                    if not timeout_set:
                        sock.settimeout(self.request_timeout)
                        timeout_set = True
                elif timeout_set:
                    sock.settimeout(None)
                    timeout_set = False
                pbuf = parser.payload_buffer()
                if pbuf is not None:
                    # Large WRITE payload: receive straight into its buffer.
                    n = sock.recv_into(pbuf)
                    pbuf.release()
                    if not n:
                        reason = "eof_partial_request"
                        break
                    parser.payload_received(n)
                    continue
                n = -1
                if spin and not timeout_set and self._connections == 1 and all(f.done() for f in pending):
                    # Busy poll: look for the next request for a little while
                    # before sleeping in recv (whose wake-up can cost more
                    # than the whole request on a VM whose idle CPUs halt).
                    # Only as the server's sole connection with no worker
                    # busy: a spinning thread would hold up other threads
                    # waiting for the GIL.
                    deadline = monotonic() + spin
                    while True:
                        try:
                            n = recv_into(rbuf, 0, _MSG_DONTWAIT)
                            break
                        except BlockingIOError:
                            if monotonic() >= deadline:
                                break
                            sched_yield()  # anything else runnable on this CPU goes first
                if n < 0:
                    if idle_ms and not timeout_set:
                        while not poller.poll(idle_ms):
                            if all(f.done() for f in pending):
                                raise _IdleTimeout  # nothing received, nothing in flight
                    n = recv_into(rbuf)
                if not n:
                    reason = "eof_partial_request" if parser.partial else "eof"
                    break
                parser.receive_data(rview[:n])
                if len(pending) > 64:
                    pending = [f for f in pending if not f.done()]
        except P.ProtocolError as exc:
            stats["protocol_errors"] += 1
            reason = f"protocol_error: {exc}"
        except TimeoutError:
            reason = "timeout_partial_request"
        except _IdleTimeout:
            reason = "idle_timeout"
        except OSError as exc:
            reason = f"connection_lost: {exc}"
        finally:
            for f in pending:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - worker errors end with the connection
                    pass
            stats["requests"] += nreq
        return reason

    # -- request execution (also runs in worker threads: no trio calls here)
    #
    # Replies are queued on ``out``, a list of buffers that goes out with one
    # scatter-gather send; each function returns the number of bytes it queued.
    def _answer_inline(self, out: list, req: P.Request, exp: _Export, structured: bool) -> int:
        """Answer ``req`` onto ``out`` if it needs no blocking work: refusal
        while shutting down, the plain READ / WRITE hot path, an inline
        backend, or a request that fails validation.  Returns the bytes
        queued, or -1: the caller hands the request to a worker.  Shared by
        both transmission loops (DISC is theirs)."""
        if self.shutting_down:
            return self._reply_error(out, req, NBD_ESHUTDOWN, structured)
        cmd = req.cmd
        flags = req.flags
        length = req.length
        # Hot path: a plain READ / WRITE in range that the backend does inline
        # (exp.inline_max), without a call to inline_ok or _validate.
        if flags == 0 and 0 < length <= exp.inline_max and req.offset + length <= exp.size:
            if cmd == NBD_CMD_READ:
                return self._read(out, req, exp.backend, structured)
            if cmd == NBD_CMD_WRITE and not exp.read_only and not req.oversized:
                try:
                    exp.write(req.offset, req.payload)
                except OSError as exc:
                    return self._reply_error(out, req, self._backend_error(cmd, exc), structured)
                out.append(_simple_pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie))
                return 16
        backend = exp.backend
        if backend.inline_ok(cmd, flags, length) or self._validate(req, exp, structured):
            return self._execute(out, req, exp, structured)
        return -1

    def _read(self, out: list, req: P.Request, backend, structured: bool) -> int:
        """Queue the reply to a validated READ.  Reads of at least
        ``_VIEW_MIN`` bytes queue views of the backend's buffers (no copy);
        smaller ones a copy.  A range that was never written (memory backend)
        is an ``OFFSET_HOLE`` chunk in a structured reply."""
        cookie, offset, length = req.cookie, req.offset, req.length
        try:
            if length < _VIEW_MIN:
                data = backend.pread(offset, length)
                parts = None if data is None else [data]
            else:
                parts = backend.read_views(offset, length)
        except OSError as exc:
            return self._reply_error(out, req, self._backend_error(NBD_CMD_READ, exc), structured)
        if structured:
            if not length:
                out.append(P.encode_structured_chunk(cookie, P.NBD_REPLY_TYPE_NONE))
                return 20
            if parts is None:
                out.append(P.encode_offset_hole(cookie, offset, length))
                return 32
            out.append(P.encode_offset_data_header(cookie, offset, length))
            out += parts
            return 28 + length
        out.append(_simple_pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
        if parts is None:
            parts = [_ZERO_VIEW] * (length // CHUNK)
            if length % CHUNK:
                parts.append(_ZERO_VIEW[: length % CHUNK])
        out += parts
        return 16 + length

    def _validate(self, req: P.Request, exp: _Export, structured: bool) -> int:
        cmd = req.cmd
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return NBD_EINVAL  # unknown command, or BLOCK_STATUS without contexts
        if req.flags & ~allowed:
            return NBD_EINVAL
        if req.flags & NBD_CMD_FLAG_DF and not structured:
            return NBD_EINVAL
        offset, length = req.offset, req.length
        if cmd == NBD_CMD_WRITE:
            if exp.read_only:
                return NBD_EPERM
            if req.oversized or length > self.max_request:
                return NBD_EINVAL
            if offset + length > exp.size:
                return NBD_ENOSPC
            return 0
        if cmd == NBD_CMD_READ:
            if length > self.max_request:
                return NBD_EINVAL
            if offset + length > exp.size:
                return NBD_EINVAL
            return 0
        if cmd in (NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES):
            if exp.read_only:
                return NBD_EPERM
            if offset + length > exp.size:
                return NBD_ENOSPC if cmd == NBD_CMD_WRITE_ZEROES else NBD_EINVAL
            return 0
        if cmd == NBD_CMD_CACHE:
            return NBD_EINVAL if offset + length > exp.size else 0
        return 0  # FLUSH

    def _reply_error(self, out: list, req: P.Request, error: int, structured: bool) -> int:
        self.stats["errors"] += 1
        if structured and req.cmd == NBD_CMD_READ:
            reply = P.encode_structured_error(req.cookie, error, P.ERROR_NAMES.get(error, ""))
        else:
            reply = _simple_pack(NBD_SIMPLE_REPLY_MAGIC, error, req.cookie)
        out.append(reply)
        return len(reply)

    @staticmethod
    def _backend_error(cmd: int, exc: OSError) -> int:
        log.warning("nbd_backend_error", cmd=P.CMD_NAMES.get(cmd, cmd), error=str(exc))
        return NBD_ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else NBD_EIO

    def _execute(self, out: list, req: P.Request, exp: _Export, structured: bool) -> int:
        """Validate and perform one request; queue its reply on ``out``."""
        err = self._validate(req, exp, structured)
        if err:
            return self._reply_error(out, req, err, structured)
        cmd = req.cmd
        if cmd == NBD_CMD_READ:
            return self._read(out, req, exp.backend, structured)
        backend = exp.backend
        fua = bool(req.flags & NBD_CMD_FLAG_FUA)
        try:
            if cmd == NBD_CMD_WRITE:
                backend.write(req.offset, req.payload, fua)
            elif cmd == NBD_CMD_FLUSH:
                backend.flush()
            elif cmd == NBD_CMD_TRIM:
                backend.trim(req.offset, req.length, fua)
            elif cmd == NBD_CMD_WRITE_ZEROES:
                backend.zero(req.offset, req.length, bool(req.flags & NBD_CMD_FLAG_NO_HOLE), fua)
            # CACHE: nothing to do.
        except OSError as exc:
            return self._reply_error(out, req, self._backend_error(cmd, exc), structured)
        out.append(_simple_pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie))
        return 16


async def serve_nbd(
    exports: list[ExportSpec],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_request: int = DEFAULT_MAX_REQUEST,
    max_inflight_per_client: int = DEFAULT_MAX_INFLIGHT,
    task_status=trio.TASK_STATUS_IGNORED,
    **kwargs,
) -> None:
    """Run an NBD server until cancelled; ``task_status.started(port)`` once
    listening.  Extra keyword arguments go to :class:`NBDServer` (timeouts,
    ``max_clients``, ``idle_timeout``, ``shutdown_grace``).  For a graceful shutdown, build an
    :class:`NBDServer` and call ``request_shutdown()``."""
    server = NBDServer(
        exports, max_request=max_request, max_inflight_per_client=max_inflight_per_client, **kwargs
    )
    await server.serve(host, port, task_status=task_status)
