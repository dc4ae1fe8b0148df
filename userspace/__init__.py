"""Not the emulated kernel: programs on the other side of the wire.

``nbd`` is the userspace NBD server (a separate host: its own process, as
the machine's embedded server or ``swapnbd serve``, or its own OS thread and
trio loop) and an NBD client for tools and tests; ``children`` makes the
processes we start die with us.  Nothing in the emulated kernel (emulator/,
net/, drivers/) imports from here, except the machine that boots the embedded
server and the sweep that starts runs.
"""

__all__ = ["children", "nbd"]
