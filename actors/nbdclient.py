"""nbd-client: the user-space program that hands the NBD driver its socket.

Models nbd-client 3.2 (nbd-client.c, July 2012) once the export is
negotiated (the first handshake is done before the machine starts:
emulator/machine.py): NBD_SET_SIZE, NBD_SET_TIMEOUT (``swap.timeout_s``),
NBD_SET_SOCK, then NBD_DO_IT, inside which the driver's receiver runs in this
process's context until the connection fails (drivers/block/nbd.py). When the
ioctl returns an error:

- without ``-persist`` nbd-client exits; the device keeps no socket, so every
  later request fails at once with -EIO ("Attempted send on closed socket");
- with ``-persist`` (``swap.persist``) it closes the socket and reconnects:
  opennet() once a second until a connect succeeds ("Reconnecting"),
  negotiate, exit if the export's size changed ("Size of the device changed.
  Bye"), then sets the sizes, the timeout and the new socket and calls
  NBD_DO_IT again.

Nothing re-issues the requests that failed meanwhile: the driver ended each
with -EIO. A swap write that failed left its page dirty in the swap cache, so
reclaim writes it again later, over the new connection; a swap-in that failed
is SIGBUS for the process that faulted (emulator/mm/memory.py).

Simplified: the handshake runs on the real socket through trio and is not
charged to emulated memory; a negotiation that fails ends nbd-client, as
err() does; the one-second sleep between connection attempts is wall-clock
time (user space), not scaled by ``time.hz_scale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from net.tcp import TcpSock, connect_raw
from userspace.nbd.client import NBDHandshakeError, nbd_handshake

if TYPE_CHECKING:
    from drivers.block.nbd import NBDDevice
    from emulator.kernel import Kernel
    from emulator.task import Task

log = structlog.get_logger("swapnbd.nbd")

#: How long the handshake with a server that accepted the connection may take
#: before nbd-client gives up on it (nbd-client itself would wait forever).
HANDSHAKE_TIMEOUT_S = 10.0
#: sleep(1) between opennet() attempts.
RECONNECT_INTERVAL_S = 1.0


async def nbd_client(k: Kernel, dev: NBDDevice, task: Task, host: str, port: int,
                     export: str, *, persist: bool, mss: int) -> None:
    """nbd-client's main loop, from the first NBD_DO_IT on."""
    while True:
        error = await dev.nbd_ioctl_do_it(task)
        if not error:
            log.info("nbd_client_exit", reason="NBD_DO_IT returned")
            return
        if not persist:
            log.error("nbd_client_exit", reason="Kernel call returned: the connection failed "
                                                "(no -persist: swap.persist = false)")
            return
        why = await reconnect(k, dev, task, host, port, export, mss)
        if why is not None:
            log.error("nbd_client_exit", reason=why)
            return


async def reconnect(k: Kernel, dev: NBDDevice, task: Task, host: str, port: int,
                    export: str, mss: int) -> str | None:
    """-persist: connect again, negotiate, NBD_SET_SOCK. None when connected, else
    why nbd-client exits."""
    started = trio.current_time()
    attempts = 0
    raw = None
    box: list = []

    async def opennet() -> None:
        try:
            box.append(await connect_raw(host, port))
        except (ConnectionError, OSError) as e:
            box.append(e)

    while raw is None:
        attempts += 1
        box.clear()
        await task.sleep_until(opennet, wchan="nbd-client(opennet)")
        if isinstance(box[0], BaseException):
            if attempts == 1:
                log.warning("nbd_reconnecting", host=host, port=port, error=str(box[0]))
            await task.sleep(RECONNECT_INTERVAL_S, wchan="nbd-client(sleep)")
            continue
        raw = box[0]
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    result: list = []

    async def negotiate() -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                result.append(await nbd_handshake(stream, export))
        except (NBDHandshakeError, trio.TooSlowError, OSError, trio.BrokenResourceError) as e:
            result.append(e)

    await task.sleep_until(negotiate, wchan="nbd-client(negotiate)")
    info = result[0]
    if isinstance(info, BaseException):
        raw.close()
        return f"negotiation with {host}:{port} failed: {info or type(info).__name__}"
    if info.size != dev.info.size:
        raw.close()
        return "Size of the device changed. Bye"
    sock = TcpSock(k, raw, "nbd0", mss)
    k.netdev.attach(sock)
    dev.stream = stream
    dev.nbd_set_sock(sock, info)
    k.vmstat["nbd_reconnects"] += 1
    log.info("nbd_reconnect", host=host, port=port, attempts=attempts,
             after_s=round(trio.current_time() - started, 3))
    return None


def start_nbd_client(k: Kernel, nursery, dev: NBDDevice, *, persist: bool,
                     timeout_s: float) -> None:
    """Start nbd-client's process: NBD_SET_TIMEOUT (``timeout_s``), then its first
    NBD_DO_IT starts the nbd0 kernel thread and runs the driver's receiver; with
    ``persist`` it reconnects after the connection fails. (The NIC's softirq,
    which receives for every socket, is started by the caller.)"""
    from emulator.flags import PF
    from emulator.sched import running

    dev.nbd_set_timeout(timeout_s)
    dev.next_thread = k.new_task("nbd0", PF.KTHREAD)  # the first NBD_DO_IT's kthread
    host, port, export = dev.peer

    async def process(task: Task) -> None:
        async with running(task):
            await nbd_client(k, dev, task, host, port, export, persist=persist, mss=dev.mss)

    nursery.start_soon(process, k.new_task("nbd-client"))
