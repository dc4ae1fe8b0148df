"""NET_RX: the NIC's interrupt and its NAPI poll, running on a CPU.

The trio side of net/dev.py: the NIC's interrupt sources and the softirq
that polls it. One softirq context (a Task with ``in_softirq``) handles the
NIC's single RX queue on CPU 0, as the e1000's interrupt is delivered to
one CPU; it holds the CPU only while it polls, and the scheduler runs it
ahead of tasks (emulator/sched.py: softirqs first).

Interrupt sources, each a small trio task that needs no emulated CPU:

- a socket's real connection has bytes for us and the socket can take them
  (its window is open, its peer is not backing off): the receive interrupt;
- a socket has pushed bytes the real connection could not take yet: they go
  out as it becomes writable (the wire; the transmit completion is the
  ``kick`` that TCP gives when it transmits);
- timers: delayed ACKs, the peers' retransmissions, our ACK recovery, the
  driver's watchdog while the ring is short, and the acknowledgement poll
  while data is unacknowledged (net/dev.py's ``next_deadline``).

Simplified: the poll runs to its budget and then yields to the next
interrupt or deadline; there is no ksoftirqd hand-off and no busy polling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from emulator.task import Task, current
from net.dev import NAPI_POLL_WEIGHT, NetDevice

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from net.tcp import TcpSock


async def net_rx_action(k: Kernel, nic: NetDevice, ctx: Task) -> None:
    """The NIC's NAPI loop, forever: wait for an interrupt or a deadline, poll."""
    current.set(ctx)  # this trio task runs only the softirq context's code
    armed: dict[TcpSock, trio.Event] = {}
    async with trio.open_nursery() as nursery:
        while True:
            for sock in nic.socks:
                if sock not in armed and not (sock.eof or sock.error):
                    armed[sock] = trio.Event()
                    nursery.start_soon(rx_interrupt, nic, sock, armed)
                    nursery.start_soon(wire_xmit, sock)
            ctx.wchan = "net_rx_action(idle)"  # no interrupt pending, no timer due
            ctx.wait_since = trio.current_time()
            with trio.move_on_at(nic.next_deadline(trio.current_time())):
                await nic.irq.wait()
            ctx.wchan = None
            nic.irq = trio.Event()
            await ctx.cpu.acquire(ctx)
            try:
                work = await nic.napi_poll(ctx)
            finally:
                ctx.cpu.release(ctx)
            if work >= NAPI_POLL_WEIGHT:
                nic.kick()  # budget used up: poll again
            for sock, ev in list(armed.items()):
                if sock.eof or sock.error or not sock.rx_blocked():
                    ev.set()  # re-enable its receive interrupt


async def rx_interrupt(nic: NetDevice, sock: TcpSock, armed: dict) -> None:
    """A socket's receive interrupt: once armed, fire when its connection is readable.
    It ends with the connection (end of file, an error, the socket closed)."""
    try:
        while not (sock.eof or sock.error):
            await armed[sock].wait()
            if sock.eof or sock.error:
                break
            await trio.lowlevel.wait_readable(sock.raw)
            armed[sock] = trio.Event()
            nic.kick()
    except (trio.ClosedResourceError, OSError):
        pass  # the socket was closed under the wait
    armed.pop(sock, None)


async def wire_xmit(sock: TcpSock) -> None:
    """Bytes TCP pushed that the real connection could not take at once go out as it
    drains."""
    try:
        while not sock.error:
            await sock.wire_ready.wait()
            sock.wire_ready = trio.Event()
            while sock.wire and not sock.error:
                await trio.lowlevel.wait_writable(sock.raw)
                sock.flush_wire()
    except (trio.ClosedResourceError, OSError):
        pass  # the socket was closed under the wait


def start_net_rx(k: Kernel, nursery: trio.Nursery, nic: NetDevice, cpu: int = 0) -> Task:
    """Start the NIC's softirq on ``cpu``; returns its context."""
    ctx = k.new_task(f"ksoftirqd/{cpu}", cpu=cpu, in_softirq=True)
    nursery.start_soon(net_rx_action, k, nic, ctx)
    return ctx
