"""A TCP socket of the emulated kernel on the machine's NIC, over a real loopback
TCP connection whose other end (the "peer") the test drives directly.

The NIC's softirq is not running: a test polls it (``Net.poll``), so every
frame's fate is decided in the order the test chooses.
"""

from __future__ import annotations

import select
import socket
from contextlib import asynccontextmanager

import trio
from netmem_helpers import kernel

from emulator.flags import PF
from emulator.sched import running
from emulator.task import Task
from net.tcp import TcpSock

MSS = 1448


class Net:
    def __init__(self, k, sock: TcpSock, peer: socket.socket, ctx: Task) -> None:
        self.k = k
        self.nic = k.netdev
        self.sock = sock
        self.peer = peer
        self.ctx = ctx

    async def poll(self) -> int:
        """One NAPI poll in the softirq context on CPU 0."""
        await self.ctx.cpu.acquire(self.ctx)
        try:
            return await self.nic.napi_poll(self.ctx)
        finally:
            self.ctx.cpu.release(self.ctx)

    def peer_send(self, data: bytes) -> None:
        """The peer writes ``data``; returns once it is readable on our side."""
        self.peer.sendall(data)
        select.select([self.sock.raw], [], [], 2.0)

    def pending_bytes(self) -> int:
        """Bytes waiting in our real socket (not yet taken by the NIC)."""
        try:
            return len(self.sock.raw.recv(1 << 20, socket.MSG_PEEK))
        except BlockingIOError:
            return 0

    async def wait_acked(self) -> None:
        """Until the real peer has acknowledged everything we wrote."""
        with trio.fail_after(5):
            while self.sock.acked_real() < self.sock.raw_sent:
                await trio.sleep(0.001)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


async def run_as(task: Task, fn, *args) -> object:
    """Run ``fn(task, *args)`` as ``task``, holding its CPU."""
    async with running(task):
        return await fn(task, *args)


@asynccontextmanager
async def tcp_on_nic(patches: str = "swapnbd", slab: str = "slub", *overrides: str,
                     name: str = "nbd0", open_ring: bool = True):
    """A kernel whose NIC carries one TCP socket ``name``, its RX ring filled
    (unless not ``open_ring``: then the ring is empty and the caches cold)."""
    k = kernel(patches, slab, *overrides)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer.settimeout(5)
    try:
        sock = TcpSock(k, ours, name, MSS)
        k.netdev.attach(sock)
        if open_ring:
            init = k.new_task("swapper", PF.KTHREAD, cpu=0)
            async with running(init):
                await k.netdev.e1000_open(init)
        ctx = k.new_task("ksoftirqd/0", cpu=0, in_softirq=True)
        yield Net(k, sock, peer, ctx)
    finally:
        ours.close()
        peer.close()
