"""The README's example stress test, verbatim: it must keep working."""


async def test_swapnbd_survives_a_slow_reader(machine):
    m = await machine("configs/quick.toml", "kernel.patches=swapnbd", "machine.slab=slub",
                      "network.background.streams=2",
                      "network.background.rate_kib_s=2048",
                      "network.background.reader_rate_kib_s=64")
    await m.wait_until(lambda m: m.vmstat["pswpout"] > m.k.nr_pages, timeout=120)
    result = await m.wait_done(timeout=300)
    assert result.outcome == "completed" and result.integrity_errors == 0
