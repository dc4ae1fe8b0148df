"""The userspace NBD hosts: server, its thread, ``swapnbd serve``, a client.

``server`` (exports, backends, connections; like nbdkit's memory plugin or
nbd-server on a raw file), ``process`` (``NBDServerProcess``: ``swapnbd
serve`` as a child process, the machine's embedded server), ``thread``
(``NBDServerThread``: the server in its own OS thread and trio loop, the
test fixture's), ``serve`` (``swapnbd serve``)
and ``client`` (handshake, URL parsing and ``NBDClient``, like libnbd).
The wire format is :mod:`nbdproto`; the kernel's driver is
:mod:`drivers.block.nbd`.
"""

__all__ = ["client", "process", "serve", "server", "thread"]
