"""The NBD server as a child process: ``swapnbd serve`` started and stopped by
the machine that swaps to it.

Counterpart: the swap server on another host (nbd-server or nbdkit on the far
side of the wire). The machine reaches it only through a TCP connection on
loopback, as with :class:`~userspace.nbd.thread.NBDServerThread`; unlike the
thread, the process does not share the emulator's GIL, so serving swap costs
the emulated machine no CPU time (docs/PERFORMANCE.md measures what the thread
cost).

The child runs ``python -m userspace.nbd.serve --port 0`` in its own session
(so a Ctrl-C at the terminal reaches the machine, which then stops the server,
rather than both at once) with ``PR_SET_PDEATHSIG`` (so it dies with the
process that started it). It says where it listens on its stdout; its log
(structured JSON, warnings and errors only) goes to a temporary file that
:meth:`NBDServerProcess.start` quotes when the child fails to start.
:meth:`NBDServerProcess.aclose` asks it to stop with SIGTERM (in-flight
requests finish) and kills it if it has not stopped within ``stop_timeout``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile

import trio

from nbdproto import nbd_url
from userspace.children import die_with_parent

from .server import ExportSpec

_LISTENING = re.compile(r"listening on nbd://(?:\[[^\]]*\]|[^:/\s]+):(\d+)/")


def export_argument(spec: ExportSpec) -> str:
    """``swapnbd serve --export``'s ``NAME=SIZE[:file=PATH][:ro]`` for ``spec``."""
    if ":" in spec.name or "=" in spec.name or (spec.path and ":" in spec.path):
        raise ValueError(f"export {spec.name!r} (path {spec.path!r}): ':' and '=' cannot be "
                         "passed to swapnbd serve's --export")
    arg = f"{spec.name}={spec.size}"
    if spec.backend == "file":
        arg += f":file={spec.path}"
    if spec.read_only:
        arg += ":ro"
    return arg


class NBDServerProcess:
    """``swapnbd serve`` in a child process, on a port the system picks.

    ::

        srv = NBDServerProcess([ExportSpec("swap", 64 << 20)])
        await srv.start()          # returns once the child listens
        ... srv.url("swap") ...
        await srv.aclose()
    """

    def __init__(self, exports: list[ExportSpec], host: str = "127.0.0.1", *,
                 start_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        self.argv = [sys.executable, "-m", "userspace.nbd.serve", "--host", host, "--port", "0",
                     "--log-level", "warning"]
        for spec in exports:
            self.argv += ["--export", export_argument(spec)]
        self.host = host
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def url(self, export_name: str = "") -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return nbd_url(self.host, self.port, export_name)

    async def start(self) -> None:
        """Start the child and wait until it listens; RuntimeError says why it did not."""
        if self.proc is not None:
            raise RuntimeError("NBDServerProcess already started")
        self._log = tempfile.TemporaryFile()
        # Forked from this thread: PR_SET_PDEATHSIG follows the thread that forks,
        # and trio's worker threads come and go.
        self.proc = subprocess.Popen(  # noqa: PLW1509 (preexec_fn: prctl only)
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, preexec_fn=die_with_parent)
        line = b""
        with trio.move_on_after(self.start_timeout):
            line = await trio.to_thread.run_sync(self.proc.stdout.readline, abandon_on_cancel=True)
        m = _LISTENING.search(line.decode(errors="replace"))
        if m is None:
            await self._terminate()
            why = self._error_text() or (line.decode(errors="replace").strip()
                                         or f"did not start within {self.start_timeout:.0f} s")
            await self.aclose()
            raise RuntimeError(f"swapnbd serve: {why}")
        self.port = int(m.group(1))

    def _error_text(self) -> str:
        """The last line the child wrote to its log (its error message, if it failed)."""
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].removeprefix("swapnbd serve: ").removeprefix("error: ") if lines else ""

    async def _terminate(self) -> None:
        """SIGTERM (a graceful stop: in-flight requests finish), then SIGKILL after
        ``stop_timeout``; returns once the child has exited."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(self.stop_timeout):
                while proc.poll() is None:
                    await trio.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
                await trio.to_thread.run_sync(proc.wait)

    async def aclose(self) -> None:
        """Stop the child (if it runs) and release its pipe and log; idempotent."""
        if self.proc is None:
            return
        await self._terminate()
        self.proc.stdout.close()
        self._log.close()
