"""The zone's LRU lists (emulator/mm/mmzone.py, LruList): intrusive lists over
the frames' pfn-indexed links behave as the kernel's list_head does.

A random sequence of list_add / list_add_tail / list_del / list_move_tail /
lru_to_page+list_del over the four lists of one zone is checked against a
plain model (a Python list per LRU, head first): the order reclaim would see
from the tail, every length, and the errors for a page added twice or removed
from no list.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.mm.mmzone import LRU_NAMES, LruList, PgData, lruvec_init
from emulator.mm.page import Page

NR_FRAMES = 12

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "add_tail", "remove", "move_tail", "pop_tail"]),
              st.integers(0, len(LRU_NAMES) - 1), st.integers(0, NR_FRAMES - 1)),
    max_size=120,
)


def fresh(start_pfn: int = 0) -> tuple[list[Page], list[LruList]]:
    mem_map: list[Page] = [Page(pfn, None) for pfn in range(start_pfn + NR_FRAMES)]
    return mem_map, lruvec_init(NR_FRAMES, mem_map, start_pfn)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, start_pfn=st.sampled_from([0, 5]))
def test_lists_follow_a_model_of_list_head(ops, start_pfn):
    mem_map, lists = fresh(start_pfn)
    model: list[list[int]] = [[] for _ in LRU_NAMES]  # pfns, head first
    where: dict[int, int] = {}  # pfn -> the list it is on
    for op, lru, i in ops:
        pfn = start_pfn + i
        page = mem_map[pfn]
        lst, m = lists[lru], model[lru]
        if op in ("add", "add_tail"):
            if pfn in where:
                with pytest.raises(ValueError):
                    getattr(lst, op)(page)
                continue
            getattr(lst, op)(page)
            if op == "add":
                m.insert(0, pfn)
            else:
                m.append(pfn)
            where[pfn] = lru
        elif op == "pop_tail":
            if not m:
                with pytest.raises(IndexError):
                    lst.pop_tail()
                continue
            oldest = m.pop()
            assert lst.pop_tail() is mem_map[oldest]
            del where[oldest]
        else:  # remove / move_tail act on the list the page is on, as page_lru names it
            if pfn not in where:
                with pytest.raises(ValueError):
                    getattr(lists[lru], op)(page)
                continue
            on = where[pfn]
            getattr(lists[on], op)(page)
            model[on].remove(pfn)
            if op == "move_tail":
                model[on].append(pfn)
            else:
                del where[pfn]
        for lst, m in zip(lists, model, strict=True):
            assert len(lst) == len(m)
            assert [p.pfn for p in lst] == m[::-1]  # iteration runs from the tail


def test_a_frame_is_on_one_list_at_a_time():
    mem_map, lists = fresh()
    lists[0].add(mem_map[3])
    with pytest.raises(ValueError, match="already on an LRU list"):
        lists[1].add_tail(mem_map[3])
    lists[0].remove(mem_map[3])
    with pytest.raises(ValueError, match="on no LRU list"):
        lists[0].remove(mem_map[3])
    lists[1].add(mem_map[3])  # poisoned links are free to use again
    assert [p.pfn for p in lists[1]] == [3] and len(lists[0]) == 0


def test_reclaim_takes_the_oldest_and_rotation_puts_a_page_next():
    """The order shrink_inactive_list sees: pages added at the head come out of
    the tail oldest first; rotate_reclaimable_page's list_move_tail puts a page
    where the next scan starts."""
    mem_map, lists = fresh()
    inactive = lists[0]
    for pfn in (1, 2, 3, 4):
        inactive.add(mem_map[pfn])
    inactive.move_tail(mem_map[3])
    assert [inactive.pop_tail().pfn for _ in range(4)] == [3, 1, 2, 4]
    with pytest.raises(IndexError):
        inactive.pop_tail()


def test_a_node_costs_eight_bytes_per_frame_in_links():
    pgdat = PgData(nr_pages=4096, min_free_kbytes=None)
    links = pgdat.node_zones[0].lru[0]._next
    assert links.itemsize == 4 and len(links) == 4096 + len(LRU_NAMES)
    assert all(lst._next is links for lst in pgdat.node_zones[0].lru)
