"""The network, after the kernel's net/: ``skbuff``, ``sock`` (struct sock),
``tcp``, ``dev`` (the NIC and the receive path), and ``nbd`` (the NBD block
driver and the NBD hosts)."""

__all__ = ["dev", "nbd", "skbuff", "sock", "tcp"]
