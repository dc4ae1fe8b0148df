"""Real NBD clients (libnbd's nbdinfo/nbdcopy/nbdsh, qemu-io, qemu-img) against our server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

MiB = 1024 * 1024

pytestmark = pytest.mark.interop


def test_nbdinfo_lists_exports_sizes_flags(tools, our_server):
    tools.need_tool("nbdinfo")
    res = tools.run(["nbdinfo", "--list", "--json", our_server.url()])
    exports = {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}
    assert set(exports) == {"", "disk", "ro"}
    assert exports[""]["export-size"] == 64 * MiB and exports[""]["description"] == "memory export"
    assert exports["disk"]["export-size"] == 32 * MiB
    assert exports["ro"]["is_read_only"] is True and exports[""]["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exports[""][flag] is True, flag
    assert exports["ro"]["can_trim"] is False
    assert exports[""]["block_size_maximum"] == 32 * MiB
    size = tools.run(["nbdinfo", "--size", our_server.url("disk")]).stdout.strip()
    assert size == str(32 * MiB)


@pytest.mark.parametrize("export", ["", "disk"])
def test_nbdcopy_roundtrip(tools, our_server, tmp_path, export):
    tools.need_tool("nbdcopy")
    src = tmp_path / "src.bin"
    size = 32 * MiB
    src.write_bytes(os.urandom(size))
    tools.run(["nbdcopy", str(src), our_server.url(export)])
    out = tmp_path / "out.bin"
    tools.run(["nbdcopy", our_server.url(export), str(out)])
    assert out.read_bytes()[:size] == src.read_bytes()


def test_qemu_io_patterns_discard_flush(tools, our_server):
    tools.need_tool("qemu-io")
    for export in ("", "disk"):
        url = our_server.url(export)
        res = tools.run(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 1M 1M",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0xcd 1M 1M",
                "-c",
                "write -z 8k 4k",
                "-c",
                "read -P 0 8k 4k",
                "-c",
                "discard 1M 64k",
                "-c",
                "flush",
                "-c",
                "write -f -P 0x11 2M 4k",  # FUA write
                "-c",
                "read -P 0x11 2M 4k",
                url,
            ]
        )
        assert "Pattern verification failed" not in res.stdout + res.stderr
        assert res.stdout.count("read ") == 4


def test_qemu_img_convert_and_compare(tools, our_server, tmp_path):
    tools.need_tool("qemu-img")
    src = tmp_path / "image.raw"
    # Same size as the export, with a zero run in the middle (qemu-img may
    # skip or zero it): the export must end up identical.
    src.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB) + os.urandom(24 * MiB))
    url = our_server.url("disk")
    tools.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url])
    res = tools.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url])
    assert "Images are identical" in res.stdout
    info = tools.run(["qemu-img", "info", "--output=json", url])
    assert json.loads(info.stdout)["virtual-size"] == 32 * MiB


def test_qemu_io_read_only_export_refuses_writes(tools, our_server):
    tools.need_tool("qemu-io")
    url = our_server.url("ro")
    res = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Permission denied" in res.stdout + res.stderr  # READ_ONLY flag honoured
    res = tools.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", url])
    assert "read 4096/4096" in res.stdout


def test_nbdsh_scripted_session(tools, our_server):
    tools.need_python_nbd()
    script = "\n".join(
        [
            "buf = b'hello nbd' + bytes(4096 - 9)",
            "h.pwrite(buf, 8192)",
            "assert h.pread(4096, 8192) == buf",
            "h.flush()",
            "h.trim(4096, 8192)",
            "assert h.pread(4096, 8192) == bytes(4096)",
            "h.pwrite(b'x' * 4096, 12288, nbd.CMD_FLAG_FUA)",
            "h.zero(1024, 12288)",
            "assert h.pread(4096, 12288) == bytes(1024) + b'x' * 3072",
            "assert h.get_size() == 64 * 1024 * 1024",
            "assert h.can_flush() and h.can_trim() and h.can_zero() and h.can_fua()",
            "print('NBDSH-OK', h.get_structured_replies_negotiated())",
        ]
    )
    res = tools.run(["nbdsh", "-u", our_server.url(), "-c", script])
    assert "NBDSH-OK True" in res.stdout
