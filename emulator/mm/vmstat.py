"""vmstat counters, named as in /proc/vmstat.

Models: mm/vmstat.c (vm_event_states, the zone/global state counters of
include/linux/mmzone.h). Events are monotonic counts; ``nr_*`` are gauges.
Per-zone event variants (``pgscan_direct_normal``) are folded into the
zone-less names because the model has one zone.

Emulator-specific counters (not in any kernel) are listed in ``EMULATOR`` and
documented in docs/MODEL.md.

Simplified: counters are exact (no per-cpu batching, so no
zone_watermark_ok_safe drift).
"""

from __future__ import annotations

#: /proc/vmstat names this model maintains.
KERNEL = (
    "nr_free_pages", "nr_inactive_anon", "nr_active_anon", "nr_inactive_file",
    "nr_active_file", "nr_anon_pages",
    "nr_mapped", "nr_file_pages", "nr_writeback", "nr_slab_reclaimable",
    "nr_slab_unreclaimable", "nr_isolated_anon", "nr_isolated_file", "nr_vmscan_write",
    "nr_swapcache",
    "pgpgin", "pgpgout", "pswpin", "pswpout", "pgalloc_normal", "pgfree",
    "pgactivate", "pgdeactivate", "pgfault", "pgmajfault", "pgrefill_normal",
    "pgsteal_kswapd_normal", "pgsteal_direct_normal", "pgscan_kswapd_normal",
    "pgscan_direct_normal", "pgscan_direct_throttle", "pginodesteal", "slabs_scanned",
    "kswapd_low_wmark_hit_quickly", "kswapd_high_wmark_hit_quickly",
    "kswapd_skip_congestion_wait", "pageoutrun", "allocstall", "pgrotated",
    "oom_kill",
)

#: Network counters with the kernel's names: /proc/net/netstat's TcpExt fields in
#: lower case (TCPBacklogDrop -> tcp_backlog_drop), and the e1000's ethtool counter.
NETSTAT = (
    "tcp_backlog_drop",  # TCPBacklogDrop: a segment for an owned socket past the backlog bound
    "tcp_prequeued",  # TCPPrequeued: segments parked for a waiting reader
    "tcp_prequeue_dropped",  # TCPPrequeueDropped: the prequeue overflowed into the softirq
    "delayed_acks",  # DelayedACKs: ACKs sent by the delayed-ACK timer
    "delayed_ack_locked",  # DelayedACKLocked: the timer found the socket owned
    "tcp_rcv_pruned",  # RcvPruned: a segment dropped for receive memory
    "tcp_ofo_queued",  # TCPOFOQueue: segments that waited on the out-of-order queue
    "alloc_rx_buff_failed",  # e1000: RX ring refills that failed
)

#: Counters the emulator adds (documented in docs/MODEL.md).
EMULATOR = (
    "nr_pcp_pages",  # free pages on per-cpu lists (zoneinfo's pagesets "count", summed)
    "pcp_drained",  # pages drain_all_pages moved from per-cpu lists to the buddy lists
    "nr_pfmemalloc_pages",  # pages currently held that were allocated with ALLOC_NO_WATERMARKS
    "pgalloc_pfmemalloc",  # pages ever allocated from the reserves
    "pgalloc_below_min",  # pages atomic/__GFP_HIGH callers took at or below the min watermark
    "alloc_fail",  # page allocations that returned NULL
    "pgalloc_high_order_fail",
    "slab_pfmemalloc_refused",
    "slab_alloc_pfmemalloc",
    "skb_alloc", "skb_alloc_pfmemalloc", "skb_drop_nomem", "skb_drop_pfmemalloc",
    "skb_rx_queued", "skb_tx_queued",
    "tcp_retransmit_timeouts", "tcp_ack_nomem", "tcp_backlog_queued", "rx_copybreak",
    "nic_rx_posted",
    "nbd_requests", "nbd_replies", "nbd_inflight", "nbd_errors",
    "nbd_read_errors", "nbd_write_errors",  # requests of that command that ended in -EIO
    "nbd_connection_lost", "nbd_reconnects", "nbd_xmit_timeouts",
    "sigbus_kill",  # processes ended by SIGBUS (a failed swap-in)
    "nbd_sender_reclaim", "nbd_sender_reclaim_exposed", "nbd_sender_near_miss",
    "mempool_wait", "integrity_errors", "throttle_active",
    "swap_used_pages", "swap_total_pages",
)

ALIASES = {
    # Zone-less short names the report and docs use.
    "pgscan_kswapd": "pgscan_kswapd_normal",
    "pgscan_direct": "pgscan_direct_normal",
    "pgsteal_kswapd": "pgsteal_kswapd_normal",
    "pgsteal_direct": "pgsteal_direct_normal",
}


class VMStat(dict):
    """A dict of counters with every known name present (0 by default)."""

    def __init__(self) -> None:
        super().__init__((name, 0) for name in KERNEL + NETSTAT + EMULATOR)

    def snapshot(self) -> dict[str, int]:
        snap = dict(self)
        for short, full in ALIASES.items():
            snap[short] = self[full]
        return snap
