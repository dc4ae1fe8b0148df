"""NBD: the kernel's block driver and the hosts on the other side of the wire.

Kernel: ``blockdev`` (drivers/block/nbd.c). Not the kernel: ``protocol`` (the
sans-I/O NBD protocol, shared by both sides), ``server`` / ``thread`` /
``serve`` (the userspace NBD server, a separate host) and ``client`` (an NBD
client for tools and tests).
"""

__all__ = ["blockdev", "client", "protocol", "serve", "server", "thread"]
