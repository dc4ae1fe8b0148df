"""GFP masks, allocator flags and task flags.

Models: include/linux/gfp.h (3.6), the ALLOC_* bits private to mm/page_alloc.c,
and the PF_* task flags of include/linux/sched.h.

Kernel names with leading double underscores (``__GFP_WAIT``) cannot be used as
Python identifiers inside classes without name mangling, so the bits live in
the ``GFP`` namespace without the prefix: ``GFP.WAIT`` is ``__GFP_WAIT``,
``GFP.MEMALLOC`` is ``__GFP_MEMALLOC``. The composite masks keep their kernel
names (``GFP_KERNEL``, ``GFP_NOIO``, ``GFP_ATOMIC`` ...). Values are 3.6's, so a
mask printed in hex reads as it would in a kernel trace.

The namespaces (``GFP``, ``PF``, and ``PG`` in mm/page.py) are ``Bits``
classes: their members are plain ints, so masks combine at the speed of integer
arithmetic (``enum.IntFlag`` cost 15 % of a run's CPU time), and
``Bits.names(value)`` renders a mask for logs and diagnoses.

Simplified: zone modifiers other than the Normal zone have no effect (the model
has one zone per node); ``__GFP_NOTRACK`` and ``__GFP_OTHER_NODE`` are absent.
"""

from __future__ import annotations


class Bits:
    """A namespace of flag bits whose members are plain ints.

    Subclasses list their bits as int class attributes. Calling the class
    returns the int (``GFP(0)`` is ``0``), as calling an IntFlag would, but
    without wrapping every result of ``&`` and ``|`` in a new object.
    """

    _members: tuple[tuple[str, int], ...] = ()

    def __new__(cls, value: int = 0) -> int:  # type: ignore[misc]
        return int(value)

    def __init_subclass__(cls) -> None:
        cls._members = tuple(
            (name, v) for name, v in vars(cls).items()
            if not name.startswith("_") and type(v) is int
        )

    @classmethod
    def items(cls) -> tuple[tuple[str, int], ...]:
        """Every (name, bit), in declaration order."""
        return cls._members

    @classmethod
    def names(cls, value: int) -> list[str]:
        """The names of the bits set in ``value``, in declaration order."""
        return [name for name, bit in cls._members if bit & value]


class GFP(Bits):
    """The ``__GFP_*`` bits of include/linux/gfp.h (3.6)."""

    DMA = 0x01
    HIGHMEM = 0x02
    DMA32 = 0x04
    MOVABLE = 0x08
    WAIT = 0x10  #: may sleep, may enter direct reclaim
    HIGH = 0x20  #: may use part of the reserve (ALLOC_HIGH)
    IO = 0x40  #: may start I/O (swap-out)
    FS = 0x80  #: may call into the file system; may OOM-kill
    COLD = 0x100
    NOWARN = 0x200
    REPEAT = 0x400
    NOFAIL = 0x800
    NORETRY = 0x1000
    MEMALLOC = 0x2000  #: patch 3: use the PFMEMALLOC reserves
    COMP = 0x4000
    ZERO = 0x8000
    NOMEMALLOC = 0x10000  #: never use the reserves; wins over MEMALLOC
    HARDWALL = 0x20000
    THISNODE = 0x40000
    RECLAIMABLE = 0x80000
    NO_KSWAPD = 0x400000
    WRITE = 0x1000000


NONE = GFP(0)
GFP_NOWAIT = NONE
GFP_ATOMIC = GFP.HIGH
GFP_NOIO = GFP.WAIT
GFP_NOFS = GFP.WAIT | GFP.IO
GFP_KERNEL = GFP.WAIT | GFP.IO | GFP.FS
GFP_USER = GFP_KERNEL | GFP.HARDWALL
GFP_HIGHUSER = GFP_USER | GFP.HIGHMEM
GFP_HIGHUSER_MOVABLE = GFP_HIGHUSER | GFP.MOVABLE
#: Flags slab passes down to the page allocator (mm/slab.h GFP_RECLAIM_MASK).
GFP_RECLAIM_MASK = (
    GFP.WAIT | GFP.HIGH | GFP.IO | GFP.FS | GFP.NOWARN | GFP.REPEAT | GFP.NOFAIL
    | GFP.NORETRY | GFP.MEMALLOC | GFP.NOMEMALLOC
)
GFP_CONSTRAINT_MASK = GFP.HARDWALL | GFP.THISNODE
GFP_SLAB_BUG_MASK = GFP.DMA32 | GFP.HIGHMEM


def gfp_name(gfp: int) -> str:
    """Render a mask as the kernel's tracepoints do: ``GFP_KERNEL|__GFP_MEMALLOC``."""
    for name, mask in (
        ("GFP_HIGHUSER_MOVABLE", GFP_HIGHUSER_MOVABLE),
        ("GFP_KERNEL", GFP_KERNEL),
        ("GFP_NOFS", GFP_NOFS),
        ("GFP_NOIO", GFP_NOIO),
        ("GFP_ATOMIC", GFP_ATOMIC),
    ):
        if gfp & mask == mask:
            rest = gfp & ~mask
            return "|".join([name] + [f"__GFP_{b}" for b in GFP.names(rest)])
    return "|".join(f"__GFP_{b}" for b in GFP.names(gfp)) or "GFP_NOWAIT"


# --- alloc_flags (mm/page_alloc.c, 3.6) --------------------------------------
ALLOC_WMARK_MIN = 0
ALLOC_WMARK_LOW = 1
ALLOC_WMARK_HIGH = 2
ALLOC_NO_WATERMARKS = 0x04
ALLOC_WMARK_MASK = ALLOC_NO_WATERMARKS - 1
ALLOC_HARDER = 0x10
ALLOC_HIGH = 0x20
ALLOC_CPUSET = 0x40

WMARK_MIN, WMARK_LOW, WMARK_HIGH = 0, 1, 2


class PF(Bits):
    """Per-task flags (include/linux/sched.h)."""

    EXITING = 0x4
    MEMALLOC = 0x800  #: allocations may ignore watermarks; never direct-reclaims
    KSWAPD = 0x40000
    SWAPWRITE = 0x800000
    KTHREAD = 0x200000
