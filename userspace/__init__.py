"""Not the emulated kernel: programs on the other side of the wire.

``nbd`` is the userspace NBD server (a separate host: its own OS thread and
trio loop, or its own process with ``swapnbd serve``) and an NBD client for
tools and tests.  Nothing in the emulated kernel (emulator/, net/, drivers/)
imports from here, except the machine that boots the embedded server.
"""

__all__ = ["nbd"]
