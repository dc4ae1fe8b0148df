"""The network, after the kernel's net/: ``skbuff``, ``sock`` (struct sock),
``tcp`` and ``dev`` (the NIC and the receive path).  The NBD driver that uses
them is :mod:`drivers.block.nbd`."""

__all__ = ["dev", "skbuff", "sock", "tcp"]
