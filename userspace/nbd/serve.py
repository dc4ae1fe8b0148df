"""``swapnbd serve``: the userspace NBD server in the foreground.

Counterpart: ``nbdkit -f memory SIZE`` / ``nbd-server -C FILE -d`` /
``qemu-nbd -t``.  Logs structured JSON events (structlog) to stderr, prints
one line with the URL(s) it listens on to stdout, and stops cleanly on
SIGINT / SIGTERM (graceful shutdown: in-flight requests finish, new ones get
``ESHUTDOWN``).

    swapnbd serve [--host H] [--port P]
                  [--export NAME=SIZE[:file=PATH][:ro][:desc=TEXT]]...
                  [--size SIZE] [--max-request-mib N]
                  [--max-clients N] [--idle-timeout S] [--handshake-timeout S]

SIZE: an integer number of bytes with an optional K/M/G/T suffix (powers of
1024), e.g. ``4096``, ``512M``, ``1G``.  ``--size`` alone serves one memory
export named ``""`` (the default export).

Limits (:data:`LIMITS_HELP`, shown by ``--help``): ``--max-clients`` clients
at once (each has a thread of its own); a client beyond them is refused in the
handshake with ``NBD_REP_ERR_POLICY``, as nbd-server refuses a client over an
export's ``maxconnections``.  ``--idle-timeout`` closes a connection that sends
nothing for that long with no request in flight (nbd-server's ``timeout``);
``--handshake-timeout`` bounds the handshake.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys

import structlog
import trio

from nbdproto import nbd_url

from .server import DEFAULT_MAX_INFLIGHT, ExportSpec, NBDServer

DEFAULT_MAX_CLIENTS = 1024
MAX_CLIENTS_LIMIT = 65536
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

LIMITS_HELP = (
    "limits: at most --max-clients clients are served at once (each has its own thread). "
    "A client beyond the cap gets the greeting, then every option it sends except ABORT is "
    "answered NBD_REP_ERR_POLICY with the message 'server is at its limit of N clients at once; "
    "try again later' (libnbd 1.14 reports 'server replied with error to opt_go request: "
    "Operation not supported', and shows the message with LIBNBD_DEBUG=1); a client that sends "
    "NBD_OPT_EXPORT_NAME, which cannot carry an error, is disconnected. Each refusal is logged "
    "(nbd_client_refused, with the peer). A connection that sends nothing for --idle-timeout "
    "seconds while none of its requests is in flight is closed (nbd_client_idle_timeout; "
    "0 = never). A handshake that has not finished after --handshake-timeout seconds is closed, "
    "and so is a request header or WRITE payload stalled half-way for 30 s."
)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` → 1073741824.  Raises ValueError naming the bad value."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 4096, 512M, 1G)")
    value = int(m.group(1)) * _MULT[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"size must be positive, not {text!r}")
    if value >= 1 << 63:
        raise ValueError(f"size {text!r} is too large")
    return value


def parse_export(text: str) -> ExportSpec:
    """``NAME=SIZE[:file=PATH][:ro][:desc=TEXT]`` → ExportSpec."""
    if "=" not in text:
        raise ValueError(f"invalid --export {text!r} (expected NAME=SIZE[:file=PATH][:ro])")
    name, rest = text.split("=", 1)
    fields = rest.split(":")
    size = parse_size(fields[0])
    backend, path, ro, desc = "memory", None, False, ""
    for f in fields[1:]:
        if f == "ro":
            ro = True
        elif f.startswith("file="):
            backend, path = "file", f[5:]
            if not path:
                raise ValueError(f"--export {text!r}: empty file path")
        elif f.startswith("desc="):
            desc = f[5:]
        else:
            raise ValueError(f"--export {text!r}: unknown option {f!r} (known: file=PATH, ro, desc=TEXT)")
    return ExportSpec(name=name, size=size, backend=backend, path=path, read_only=ro, description=desc)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=10809, help="TCP port (default 10809; 0 = any free port)")
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=SIZE[:file=PATH][:ro]",
        help="an export (repeatable); SIZE like 4096, 512M, 1G",
    )
    parser.add_argument("--size", default=None, help="size of the single default export named '' (e.g. 1G)")
    parser.add_argument(
        "--max-request-mib", type=int, default=32, help="largest READ/WRITE accepted, MiB (default 32)"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        help="requests in flight per client (default 64)",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        help="wait for the next request by spinning up to this many microseconds before sleeping, "
        "while there is one client (default 0 = never spin; costs CPU, see docs/PERFORMANCE.md)",
    )
    parser.add_argument(
        "--max-clients",
        type=int,
        default=DEFAULT_MAX_CLIENTS,
        metavar="N",
        help=f"clients served at once (default {DEFAULT_MAX_CLIENTS}); "
        "one more is refused in the handshake with NBD_REP_ERR_POLICY",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="close a connection that sends nothing for this long with no request in flight "
        "(default 0 = never)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help=f"close a connection whose handshake has not finished after this long "
        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    if parser.epilog is None:
        parser.epilog = LIMITS_HELP


def _configure_logging(level: str) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _build_exports(args) -> list[ExportSpec]:
    exports = [parse_export(e) for e in args.export]
    if args.size is not None:
        if any(e.name == "" for e in exports):
            raise ValueError("--size defines the default export '', which --export already defines")
        exports.insert(0, ExportSpec(name="", size=parse_size(args.size)))
    if not exports:
        raise ValueError("nothing to serve: give --size SIZE or at least one --export NAME=SIZE")
    names = [e.name for e in exports]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise ValueError(f"duplicate export name(s): {sorted(dups)}")
    return exports


async def _serve(server: NBDServer, host: str, port: int, announce) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve, host, port)
            urls = " ".join(nbd_url(host, bound, s.name) for s in server.specs)
            announce(f"swapnbd serve: listening on {urls}")
            async for signum in signals:
                structlog.get_logger("userspace.nbd.serve").info(
                    "nbd_serve_signal", signal=signal.Signals(signum).name
                )
                server.request_shutdown()
                break


def serve_main(args) -> int:
    """Entry point for ``swapnbd serve`` (``args`` from :func:`add_serve_arguments`)."""
    try:
        exports = _build_exports(args)
        if not 1 <= args.max_request_mib <= 4095:
            raise ValueError(f"--max-request-mib must be between 1 and 4095, not {args.max_request_mib}")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, not {args.port}")
        for e in exports:
            if e.backend == "file" and e.read_only:
                import os

                if not os.path.exists(e.path):  # type: ignore[arg-type]
                    raise ValueError(f"export {e.name!r}: read-only file {e.path!r} does not exist")
        if not 0 <= args.busy_poll_us <= 1_000_000:
            raise ValueError(f"--busy-poll-us must be between 0 and 1000000, not {args.busy_poll_us}")
        if not 1 <= args.max_clients <= MAX_CLIENTS_LIMIT:
            raise ValueError(
                f"--max-clients must be between 1 and {MAX_CLIENTS_LIMIT}, not {args.max_clients}"
            )
        if not 0 <= args.idle_timeout < 1e9:  # also refuses nan
            raise ValueError(
                f"--idle-timeout must be 0 (never) or a number of seconds, not {args.idle_timeout}"
            )
        if not 0 < args.handshake_timeout < 1e9:
            raise ValueError(
                f"--handshake-timeout must be a positive number of seconds, not {args.handshake_timeout}"
            )
        server = NBDServer(
            exports,
            max_request=args.max_request_mib * 1024 * 1024,
            max_inflight_per_client=args.max_inflight,
            busy_poll_us=args.busy_poll_us,
            max_clients=args.max_clients,
            idle_timeout=args.idle_timeout,
            handshake_timeout=args.handshake_timeout,
        )
    except ValueError as exc:
        print(f"swapnbd serve: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(getattr(args, "log_level", "info"))
    try:
        trio.run(_serve, server, args.host, args.port, lambda line: print(line, flush=True))
    except (OSError, BaseExceptionGroup) as exc:
        oserr = _find_oserror(exc)
        if oserr is None:
            raise
        print(f"swapnbd serve: error: cannot serve on {args.host}:{args.port}: {oserr}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _find_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find_oserror(sub)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swapnbd serve", description="Serve NBD exports in the foreground.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
