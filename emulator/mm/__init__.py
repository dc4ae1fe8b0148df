"""The memory model, file for file after the kernel's mm/.

``page`` (struct page), ``mmzone`` (zones, watermarks, the buddy free lists,
per-cpu lists, pageblocks), ``page_alloc`` (the allocator's paths),
``vmstat``, ``slab_common`` / ``slab`` / ``slub`` / ``kmalloc`` (the slab
allocators), ``mempool``, ``memory`` (address spaces and faults), ``swap``
(the LRU entry points), ``swapfile`` / ``swap_state`` / ``page_io`` (swap
slots, the swap cache, swap I/O), ``filemap``, ``rmap``, ``vmscan``
(reclaim), ``backing_dev`` (congestion), ``oom_kill``.
"""

__all__ = ["backing_dev", "filemap", "kmalloc", "memory", "mempool", "mmzone", "oom_kill", "page",
           "page_alloc", "page_io", "rmap", "slab", "slab_common", "slub", "swap", "swap_state",
           "swapfile", "vmscan", "vmstat"]
