"""Background network traffic into ordinary sockets.

Models the unrelated traffic a real machine receives while it swaps (the
seed's test machine was on a network, monitored over ssh): TCP streams from
another host into ordinary sockets (no SOCK_MEMALLOC) read by a user process
at its own pace. Their receive buffers are allocated by the same NET_RX path
as the NBD replies, from the same reserves — which is exactly the competition
the series resolves: with the patches, a packet that could only be received
into reserve memory but belongs to an ordinary socket is dropped by sk_filter
and its bytes are retransmitted later.

The sender is a separate host: its own OS thread writing to real loopback
TCP connections at ``rate_kib_s`` per stream with blocking sends, so TCP flow
control holds it back when the machine's receive queues are full. The
machine's side of each stream is a TCP socket on the machine's NIC (the same
RX ring and softirq as the NBD socket) and a reader process ("netreader")
that consumes ``reader_rate_kib_s`` per stream with tcp_recvmsg.

Simplified: the reader is a task without an address space (its receive
buffer copy is not charged); one reader per stream.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

import trio

from emulator.sched import running
from net.tcp import TcpSock

if TYPE_CHECKING:
    from emulator.config import BackgroundConfig
    from emulator.kernel import Kernel

CHUNK = 16 * 1024


class BackgroundSender:
    """The remote host: one OS thread writing ``streams`` rate-limited TCP streams."""

    def __init__(self, port: int, streams: int, rate_kib_s: int) -> None:
        self.port = port
        self.streams = streams
        self.rate = rate_kib_s * 1024
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="netload-sender", daemon=True)
        self.bytes_sent = 0
        self.connected = threading.Event()

    def start(self) -> None:
        for _ in range(self.streams):
            s = socket.create_connection(("127.0.0.1", self.port))
            s.settimeout(0.2)
            self._socks.append(s)
        self.connected.set()
        self._thread.start()

    def _run(self) -> None:
        payload = bytes(range(256)) * (CHUNK // 256)
        start = time.monotonic()
        while not self._stop.is_set():
            due = self.rate * (time.monotonic() - start) / max(1, self.streams)
            for s in self._socks:
                if self._stop.is_set():
                    break
                per_stream = self.bytes_sent / max(1, self.streams)
                if per_stream >= due:
                    continue
                try:
                    n = s.send(payload)
                    self.bytes_sent += n
                except (TimeoutError, BlockingIOError):
                    continue  # the receiver's window is closed: try later
                except OSError:
                    return
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


async def netreader(k: Kernel, sock: TcpSock, rate_kib_s: int, cpu: int) -> None:
    """A user process reading its socket at ``rate_kib_s``."""
    task = k.new_task("netreader", cpu=cpu)
    rate = max(1, rate_kib_s) * 1024
    async with running(task):
        start = trio.current_time()
        got = 0
        while True:
            data = await sock.tcp_recvmsg(task, CHUNK, waitall=False,
                                          wchan=f"sk_wait_data({sock.name})")
            if not data:
                return
            got += len(data)
            ahead = got / rate - (trio.current_time() - start)
            if ahead > 0:
                await task.sleep(ahead, wchan="nanosleep")
            else:
                await task.cond_resched()


async def start_background_traffic(k: Kernel, nursery, bg: BackgroundConfig, mss: int,
                                   senders: list) -> list[TcpSock]:
    """Open ``bg.streams`` connections from a sender thread, attach each to the NIC
    and start a reader process for it. Returns the machine-side sockets."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(bg.streams)
    port = listener.getsockname()[1]
    sender = BackgroundSender(port, bg.streams, bg.rate_kib_s)
    senders.append(sender)
    await trio.to_thread.run_sync(sender.start)
    socks = []
    for i in range(bg.streams):
        raw, _ = listener.accept()
        raw.setblocking(False)
        sock = TcpSock(k, raw, f"bg{i}", mss)
        k.netdev.attach(sock)
        socks.append(sock)
    listener.close()
    ncpu = len(k.cpus)
    for i, sock in enumerate(socks):
        nursery.start_soon(netreader, k, sock, bg.reader_rate_kib_s, (i + 1) % ncpu)
    return socks
