"""One direction of dependency, read off the imports (issue 23's layout rules).

The model (emulator/, net/ and drivers/) never imports the actors, which drive
it, nor the userspace hosts on the other side of the wire; the memory model
does not know about configs, the machine or the CLI; the block layer does not
reach into reclaim; the sans-I/O protocol imports nothing of ours. Every import statement counts, those under
``if TYPE_CHECKING:`` included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The machine and its front ends assemble the actors; they may import them.
ASSEMBLERS = {"emulator/machine.py", "emulator/cli.py", "emulator/testing.py",
              "emulator/experiment.py", "emulator/sweep.py", "emulator/report.py"}
#: The packages that are the emulated kernel.
KERNEL = ("emulator", "net", "drivers")
#: First-party top-level packages.
OURS = ("emulator", "actors", "net", "drivers", "nbdproto", "userspace")


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", [p for p in files(*KERNEL) if rel(p) not in ASSEMBLERS],
                         ids=rel)
def test_the_model_does_not_import_the_actors(path):
    bad = sorted(m for m in imports(path) if m == "actors" or m.startswith("actors."))
    assert not bad, f"{rel(path)} imports {bad}"


@pytest.mark.parametrize("path", files("emulator/mm"), ids=rel)
def test_mm_does_not_import_config_machine_or_cli(path):
    forbidden = ("emulator.config", "emulator.machine", "emulator.cli")
    bad = sorted(m for m in imports(path) if m.startswith(forbidden))
    assert not bad, f"{rel(path)} imports {bad}"


def test_the_block_layer_does_not_import_reclaim():
    bad = sorted(m for m in imports(ROOT / "emulator/block.py")
                 if m.startswith("emulator.mm.vmscan"))
    assert not bad


def test_the_actors_are_the_only_trio_entry_points():
    """Outside the actors and the assemblers, model code starts no trio task of its
    own: no ``start_soon`` and no nursery."""
    offenders = []
    for p in files(*KERNEL):
        if rel(p) in ASSEMBLERS or rel(p).startswith("emulator/analysis/"):
            continue  # the analysis tools are not the model
        text = p.read_text()
        if "start_soon" in text or "open_nursery" in text:
            offenders.append(rel(p))
    assert not offenders


@pytest.mark.parametrize("path", [p for p in files(*KERNEL) if rel(p) not in ASSEMBLERS], ids=rel)
def test_the_kernel_does_not_import_the_userspace_hosts(path):
    """The NBD server and client are another host: the kernel reaches them only
    over the wire (drivers/block/nbd.py speaks nbdproto on an emulated socket)."""
    bad = sorted(m for m in imports(path) if m == "userspace" or m.startswith("userspace."))
    assert not bad, f"{rel(path)} imports {bad}"


@pytest.mark.parametrize("path", files("nbdproto"), ids=rel)
def test_the_protocol_is_sans_io(path):
    """nbdproto is shared by both sides of the wire and does no I/O: no trio, no
    sockets, nothing of ours outside itself."""
    bad = sorted(m for m in imports(path)
                 if m.split(".")[0] in {"trio", "socket", "selectors"}
                 or (m.split(".")[0] in OURS and not m.startswith("nbdproto")))
    assert not bad, f"{rel(path)} imports {bad}"
