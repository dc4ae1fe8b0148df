"""Run an NBD server in its own OS thread with its own trio loop.

Counterpart: a separate NBD server host (nbd-server / nbdkit on another
machine).  The emulated machine reaches this server only through a real TCP
connection on loopback; nothing in the machine calls into the server's
objects.  Simplified: it shares the Python process (and the GIL) with the
machine, so its CPU time competes with the emulator's.
"""

from __future__ import annotations

import threading

import structlog
import trio

from nbdproto import nbd_url

from .server import ExportSpec, NBDServer

log = structlog.get_logger("userspace.nbd.thread")


class NBDServerThread:
    """``with NBDServerThread([ExportSpec("", 64 << 20)]) as srv: srv.url()``"""

    def __init__(
        self, exports: list[ExportSpec], host: str = "127.0.0.1", port: int = 0, **server_kwargs
    ) -> None:
        self.exports = list(exports)
        self.host = host
        self.requested_port = port
        self.server_kwargs = server_kwargs
        self.port: int | None = None
        self.server: NBDServer | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> NBDServerThread:
        """Start the thread and block until the server listens (or raise why it could not)."""
        if self._thread is not None:
            raise RuntimeError("NBDServerThread already started")
        # Build the server here so bad arguments raise in the caller's thread.
        self.server = NBDServer(self.exports, **self.server_kwargs)
        self._thread = threading.Thread(target=self._run, name=f"nbd-server-{self.host}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"NBD server failed to start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to start()/stop()
            if not self._started.is_set():
                self._error = exc
            else:
                log.error("nbd_server_thread_crashed", error=repr(exc))
                self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        assert self.server is not None
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.server.serve, self.host, self.requested_port)
                self._started.set()

    def url(self, export_name: str = "") -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return nbd_url(self.host, self.port, export_name)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: shutdown (in-flight finish, ESHUTDOWN, grace period),
        then cancel whatever is left; join the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        token = self._token
        server = self.server
        if token is not None and server is not None:
            try:
                trio.from_thread.run_sync(server.request_shutdown, trio_token=token)
            except (trio.RunFinishedError, RuntimeError):
                pass
        thread.join(timeout)
        if thread.is_alive() and token is not None and self._cancel_scope is not None:
            try:
                trio.from_thread.run_sync(self._cancel_scope.cancel, trio_token=token)
            except (trio.RunFinishedError, RuntimeError):
                pass
            thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("NBD server thread did not stop")

    def __enter__(self) -> NBDServerThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
