"""Block device drivers, after the kernel's drivers/block/.

``nbd`` is drivers/block/nbd.c: the emulated kernel's NBD client, which turns
block requests into NBD requests on an emulated TCP socket.
``nbd_sender_stalls`` instruments its sender (how long and where the sender
slept with the socket owned); the kernel has no such file.
"""

__all__ = ["nbd", "nbd_sender_stalls"]
