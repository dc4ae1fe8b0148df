"""Machine configuration: TOML files -> frozen attrs objects.

Models: the knobs of the machine under test (boot parameters, sysctls, the
MMTests workload configuration). Every value is checked before anything
starts; every problem is a ConfigError naming the key (``section.key``) and
what is allowed. ``--set section.key=value`` overrides are applied to the TOML
data before validation, so they get the same checks.

Kernel parameters that exist in the kernel (min_free_kbytes, the slab
allocator, the patch set) are the only ones that change kernel behaviour;
everything else describes the workload, the swap device or the run.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from emulator.patches import PATCHES, PRESETS, PatchSet
from nbdproto import parse_nbd_url


class ConfigError(Exception):
    """A bad configuration value. ``key`` is ``section.key`` (or the file)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


#: ``page_cache_mib = "auto"``: this fraction of memory (the seed configs' 1/8).
PAGE_CACHE_AUTO_FRACTION = 8


@attrs.frozen
class MachineConfig:
    cpus: int = 2
    memory_mib: int = 32
    min_free_kbytes: int | None = None  # None = "auto": the kernel's formula
    slab: str = "slub"
    #: clean page cache present when the workload starts, in MiB; None = "auto":
    #: memory_mib / 8, so that it scales with memory
    page_cache_mib: int | None = None

    @property
    def page_cache(self) -> int:
        """The page cache in MiB, "auto" resolved."""
        if self.page_cache_mib is None:
            return self.memory_mib // PAGE_CACHE_AUTO_FRACTION
        return self.page_cache_mib


@attrs.frozen
class KernelConfig:
    patches: PatchSet = PatchSet.preset("swapnbd")


@attrs.frozen
class SwapConfig:
    size_mib: int = 128
    server: str = "embedded"
    backend: str = "memory"
    path: str | None = None
    #: NBD_SET_TIMEOUT (nbd-client -timeout): seconds a send may take before the
    #: driver kills it and shuts the socket down; 0 = none (the default, as in 3.6)
    timeout_s: float = 0.0
    #: nbd-client -persist: reconnect after the connection fails
    persist: bool = False


@attrs.frozen
class WorkloadConfig:
    kind: str = "anon-mmap-write"
    processes_per_cpu: int = 2
    size_ratio: float = 2.0
    passes: int = 2
    rate_pages_s: float = 0.0  # per process; 0 = as fast as the CPU allows (usemem)


@attrs.frozen
class RunConfig:
    lockup_timeout_s: float = 20.0
    max_duration_s: float = 600.0
    sample_interval_ms: int = 250
    seed: int = 1
    log: str | None = None


@attrs.frozen
class TimeConfig:
    hz_scale: float = 1.0


@attrs.frozen
class BackgroundConfig:
    streams: int = 0
    rate_kib_s: int = 0
    reader_rate_kib_s: int = 0


@attrs.frozen
class NetworkConfig:
    rx_buffers: str = "page_frag"  # the NIC driver's RX buffers: e1000's page fragments
    rx_ring: int = 256  # RX descriptors (E1000_DEFAULT_RXD)
    mss: int = 1448
    background: BackgroundConfig = BackgroundConfig()


@attrs.frozen
class Config:
    machine: MachineConfig = MachineConfig()
    kernel: KernelConfig = KernelConfig()
    swap: SwapConfig = SwapConfig()
    workload: WorkloadConfig = WorkloadConfig()
    run: RunConfig = RunConfig()
    time: TimeConfig = TimeConfig()
    network: NetworkConfig = NetworkConfig()
    source: str = ""

    @property
    def workload_pages(self) -> int:
        return int(self.workload.size_ratio * self.machine.memory_mib * 256)

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=True, value_serializer=_serialize)
        return d


def _serialize(inst, field, value):
    if isinstance(value, PatchSet):
        return {"name": value.name, "applied": sorted(value.applied)}
    return value


# -- validation helpers ------------------------------------------------------------
def _int(key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer in [{lo}, {hi}], got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(key, f"{v} is out of range; allowed {lo}..{hi}")
    return v


def _float(key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"expected a number in [{lo}, {hi}], got {v!r}")
    v = float(v)
    if not (lo <= v <= hi) or math.isnan(v):
        raise ConfigError(key, f"{v} is out of range; allowed {lo}..{hi}")
    return v


def _choice(key: str, v: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if v not in choices:
        raise ConfigError(key, f"{v!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {v!r}")
    return v


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {v!r}")
    return v


def _patches(key: str, v: Any) -> PatchSet:
    if isinstance(v, str):
        if v not in PRESETS:
            raise ConfigError(key, f"{v!r} is not a preset; use one of {sorted(PRESETS)} "
                                   "or a list of patch numbers 1-16")
        return PatchSet.preset(v)
    if isinstance(v, list):
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or x not in PATCHES]
        if bad:
            raise ConfigError(key, f"unknown patch number(s) {bad}; patches are 1-16")
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ConfigError(key, f"patch number(s) {dup} listed more than once; list each "
                                   "patch once")
        return PatchSet.of(v)
    raise ConfigError(key, f"expected \"vanilla\", \"swapnbd\" or a list of patch numbers 1-16, got {v!r}")


_SCHEMA: dict[str, dict[str, Any]] = {
    "machine": {
        "cpus": lambda k, v: _int(k, v, 1, 64),
        "memory_mib": lambda k, v: _int(k, v, 4, 65536),
        "min_free_kbytes": lambda k, v: None if v == "auto" else _int(k, v, 16, 1 << 20),
        "slab": lambda k, v: _choice(k, v, ("slab", "slub")),
        "page_cache_mib": lambda k, v: None if v == "auto" else _int(k, v, 0, 1 << 20),
    },
    "kernel": {"patches": _patches},
    "swap": {
        "size_mib": lambda k, v: _int(k, v, 1, 1 << 20),
        "server": lambda k, v: _server(k, v),
        "backend": lambda k, v: _choice(k, v, ("memory", "file")),
        "path": lambda k, v: _str(k, v),
        "timeout_s": lambda k, v: _float(k, v, 0.0, 86400.0),
        "persist": lambda k, v: _bool(k, v),
    },
    "workload": {
        "kind": lambda k, v: _choice(k, v, ("anon-mmap-write",)),
        "processes_per_cpu": lambda k, v: _int(k, v, 1, 64),
        "size_ratio": lambda k, v: _float(k, v, 0.01, 64.0),
        "passes": lambda k, v: _int(k, v, 1, 1000),
        "rate_pages_s": lambda k, v: _float(k, v, 0.0, 1e7),
    },
    "run": {
        "lockup_timeout_s": lambda k, v: _float(k, v, 0.5, 86400),
        "max_duration_s": lambda k, v: _float(k, v, 1, 7 * 86400),
        "sample_interval_ms": lambda k, v: _int(k, v, 10, 600_000),
        "seed": lambda k, v: _int(k, v, 0, 2**63 - 1),
        "log": lambda k, v: _str(k, v),
    },
    "time": {"hz_scale": lambda k, v: _float(k, v, 0.001, 100.0)},
    "network": {
        "rx_buffers": lambda k, v: _choice(k, v, ("kmalloc", "page_frag")),
        "rx_ring": lambda k, v: _int(k, v, 48, 4096),  # e1000's limits (E1000_MIN/MAX_RXD)
        "mss": lambda k, v: _int(k, v, 256, 65483),
    },
    "network.background": {
        "streams": lambda k, v: _int(k, v, 0, 64),
        "rate_kib_s": lambda k, v: _int(k, v, 0, 1 << 20),
        "reader_rate_kib_s": lambda k, v: _int(k, v, 0, 1 << 20),
    },
}

_CLASSES = {
    "machine": MachineConfig, "kernel": KernelConfig, "swap": SwapConfig,
    "workload": WorkloadConfig, "run": RunConfig, "time": TimeConfig,
    "network": NetworkConfig, "network.background": BackgroundConfig,
}


def _server(key: str, v: Any) -> str:
    v = _str(key, v)
    if v == "embedded":
        return v
    if not v.startswith("nbd://"):
        raise ConfigError(key, f"{v!r} is neither \"embedded\" nor an nbd://HOST:PORT/EXPORT URL")
    try:
        parse_nbd_url(v)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    return v


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value``; the value is read as TOML (``2``, ``"slab"``, ``[1, 15]``),
    falling back to a bare string (``machine.slab=slab``)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(key, "an override key must be section.key (e.g. machine.cpus)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.rpartition(".")
        if section not in _SCHEMA:
            raise ConfigError(key, f"unknown section {section!r}; sections are "
                                   f"{', '.join(sorted(_SCHEMA))}")
        node = data
        for part in section.split("."):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part!r} is not a table")
        node[name] = value
    return data


def from_dict(data: Mapping, source: str = "") -> Config:
    """Validate a parsed TOML document and build the Config."""
    built: dict[str, Any] = {}

    def section(name: str, table: Mapping) -> Any:
        schema = _SCHEMA[name]
        kwargs = {}
        for key, value in table.items():
            full = f"{name}.{key}"
            if f"{name}.{key}" in _SCHEMA:
                if not isinstance(value, Mapping):
                    raise ConfigError(full, "expected a table")
                kwargs[key] = section(full, value)
                continue
            if key not in schema:
                raise ConfigError(full, f"unknown key; {name} keys are "
                                        f"{', '.join(sorted(schema))}")
            kwargs[key] = schema[key](full, value)
        return _CLASSES[name](**kwargs)

    for name, table in data.items():
        if name not in _SCHEMA or "." in name:
            raise ConfigError(name, f"unknown section; sections are "
                                    f"{', '.join(s for s in _SCHEMA if '.' not in s)}")
        if not isinstance(table, Mapping):
            raise ConfigError(name, "expected a table")
        built[name] = section(name, table)
    cfg = Config(**built, source=source)
    _check_cross(cfg)
    return cfg


def _check_cross(cfg: Config) -> None:
    need = math.ceil(cfg.workload.size_ratio * cfg.machine.memory_mib)
    if cfg.swap.size_mib < need:
        raise ConfigError("swap.size_mib",
                          f"{cfg.swap.size_mib} MiB is smaller than the workload needs "
                          f"(size_ratio x memory_mib = {need} MiB); allowed >= {need}")
    if cfg.swap.backend == "file" and cfg.swap.server == "embedded" and not cfg.swap.path:
        raise ConfigError("swap.path", "backend \"file\" needs swap.path (the backing file)")
    if cfg.machine.page_cache * 2 > cfg.machine.memory_mib:
        raise ConfigError("machine.page_cache_mib",
                          f"{cfg.machine.page_cache_mib} MiB is more than half of memory; "
                          f"allowed 0..{cfg.machine.memory_mib // 2}, or \"auto\" "
                          f"(memory_mib / {PAGE_CACHE_AUTO_FRACTION})")
    mfk = cfg.machine.min_free_kbytes
    if mfk is not None and mfk // 4 >= cfg.machine.memory_mib * 256 // 2:
        raise ConfigError("machine.min_free_kbytes",
                          f"{mfk} KiB reserves half of memory or more; allowed < "
                          f"{cfg.machine.memory_mib * 512} KiB for {cfg.machine.memory_mib} MiB")


# -- packaged configs ---------------------------------------------------------------------
def packaged_configs() -> Path:
    """The directory of the configs shipped with the package (emulator/configs)."""
    return Path(__file__).resolve().parent / "configs"


def config_names() -> list[str]:
    """The packaged configs' names (``quick``, ``vanilla-slub``, ...)."""
    return sorted(p.stem for p in packaged_configs().glob("*.toml"))


def resolve_config(path: str | Path) -> Path:
    """A config file: ``path`` if it exists, else the packaged config of that name
    (``quick`` or ``quick.toml``), so that ``swapnbd run quick`` works anywhere."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.name.removesuffix(".toml")
    packaged = packaged_configs() / f"{name}.toml"
    return packaged if packaged.exists() else path


# -- host memory ----------------------------------------------------------------------------
#: What one run costs the host beyond the emulated pages: the interpreter, trio,
#: the modules (measured: ~40 MiB RSS for a 16 MiB machine).
HOST_BASE_MIB = 48
#: Host bytes per emulated page (struct page, the buddy and LRU structures: ~200 B
#: measured at boot, more once pages are mapped and in the swap cache).
HOST_BYTES_PER_PAGE = 256
#: Host bytes per workload page (its PTE slot, the encoded page while it is written).
HOST_BYTES_PER_WORKLOAD_PAGE = 16


def host_memory_mib(cfg: Config) -> int:
    """About how much host memory (RSS, MiB) a run of ``cfg`` needs: the base, the
    emulated pages, the workload's page tables, and, with the embedded server's
    memory backend, the swapped-out pages it stores (4 KiB each: the workload
    beyond memory)."""
    nr_pages = cfg.machine.memory_mib * 256
    workload = cfg.workload_pages
    need = (HOST_BASE_MIB * 2**20 + nr_pages * HOST_BYTES_PER_PAGE
            + workload * HOST_BYTES_PER_WORKLOAD_PAGE)
    if cfg.swap.server == "embedded" and cfg.swap.backend == "memory":
        need += max(0, workload - nr_pages) * 4096
    return math.ceil(need / 2**20)


def host_available_mib() -> int | None:
    """MemAvailable from /proc/meminfo, in MiB (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(cfg: Config, available_mib: int | None = None) -> None:
    """Refuse a config whose run would not fit in the host's available memory."""
    available = host_available_mib() if available_mib is None else available_mib
    if available is None:
        return
    need = host_memory_mib(cfg)
    if need > available:
        hint = ""
        if cfg.swap.server == "embedded" and cfg.swap.backend == "memory":
            hint = " (the embedded server keeps swapped pages in memory; swap.backend = \"file\" does not)"
        raise ConfigError("machine.memory_mib",
                          f"{cfg.machine.memory_mib} MiB needs about {need} MiB of host memory, "
                          f"and this host has {available} MiB available{hint}")


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and validate a config file (or a packaged config's name), and
    check that the run fits in the host's memory."""
    path = resolve_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(config_names())
        raise ConfigError(str(path), f"no such config file (packaged configs: {names})") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    data = apply_overrides(data, overrides)
    cfg = from_dict(data, source=str(path))
    check_host_memory(cfg)
    return cfg
