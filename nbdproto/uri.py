"""NBD URIs: ``nbd://host[:port]/export``.

Counterpart: the NBD URI specification (NetworkBlockDevice/nbd ``doc/uri.md``),
as libnbd's ``nbd_connect_uri`` and qemu read it.  Pure parsing and
formatting, no I/O: the config loader checks ``swap.server`` with it before
anything connects; the servers say where they listen with ``nbd_url``.

Simplified: only plain ``nbd://`` over TCP; TLS (``nbds``), Unix and vsock
schemes, and query parameters (``tls-*``, ``socket=``) are refused with a
message.
"""

from __future__ import annotations

import urllib.parse

from .constants import NBD_DEFAULT_PORT, NBD_MAX_STRING


def parse_nbd_url(url: str) -> tuple[str, int, str]:
    """``nbd://host[:port]/name`` → (host, port, export_name).  Default port
    10809; ``nbd://host`` and ``nbd://host/`` name the default export ``""``."""
    if not isinstance(url, str) or not url:
        raise ValueError("empty NBD URL (expected nbd://host[:port]/export)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "nbd":
        if parts.scheme in ("nbds", "nbd+unix", "nbds+unix", "nbd+vsock"):
            raise ValueError(
                f"unsupported NBD URL scheme {parts.scheme!r} in {url!r} (only plain nbd:// over TCP)"
            )
        raise ValueError(f"not an NBD URL: {url!r} (expected nbd://host[:port]/export)")
    host = parts.hostname
    if not host:
        raise ValueError(f"NBD URL {url!r} has no host (expected nbd://host[:port]/export)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"NBD URL {url!r} has an invalid port") from None
    if port is None:
        port = NBD_DEFAULT_PORT
    if port == 0:
        raise ValueError(f"NBD URL {url!r} has port 0")
    if parts.query or parts.fragment:
        raise ValueError(f"NBD URL {url!r}: query strings and fragments are not supported")
    name = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(name.encode()) > NBD_MAX_STRING:
        raise ValueError("export name in NBD URL is longer than 4096 bytes")
    return host, port, name


def nbd_url(host: str, port: int, export_name: str = "") -> str:
    """(host, port, export_name) → ``nbd://host:port/name``, the inverse of
    :func:`parse_nbd_url` (an IPv6 host in brackets, the name percent-encoded)."""
    h = f"[{host}]" if ":" in host else host
    return f"nbd://{h}:{port}/{urllib.parse.quote(export_name)}"
