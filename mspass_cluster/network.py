"""Addresses: which one compute nodes use to reach the scheduler, which local port is free."""

from __future__ import annotations

import logging
import socket

from distributed.utils import get_ip_interface

from .errors import ConfigError

__all__ = ["scheduler_host", "free_local_port"]

logger = logging.getLogger(__name__)


def scheduler_host(interface: str | None, node_addresses: list[str]) -> tuple[str, str]:
    """The address to bind the scheduler to, and how it was chosen.

    Parameters
    ----------
    interface : str or None
        A network interface name (``ib0``); its IPv4 address wins.
    node_addresses : list of str
        Addresses (or names) of compute nodes. The first that routes gives the
        local address the kernel uses to reach it: the one nodes can answer.

    Returns
    -------
    address, reason : str, str

    Raises
    ------
    ConfigError
        When ``interface`` does not exist or has no IPv4 address.
    """
    if interface:
        try:
            return get_ip_interface(interface), f"interface={interface!r}"
        except ValueError as exc:
            raise ConfigError(
                f"interface={interface!r}: {exc}. Pick one of this machine's interfaces (see `ip -br addr`)."
            ) from exc
    for node in node_addresses:
        address = _source_address(node)
        if address:
            return address, f"the route to compute node {node}"
    address = _source_address("8.8.8.8") or socket.gethostbyname(socket.gethostname())
    return address, "the default route (no compute node address was known)"


def _source_address(host: str) -> str | None:
    """The local address the kernel would send from to reach ``host``; no packet is sent."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            address = sock.getsockname()[0]
    except OSError:
        return None
    if address == "0.0.0.0" or (address.startswith("127.") and not target.startswith("127.")):
        return None
    return address


def free_local_port(start: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first port from ``start`` on that a server could listen on at ``host``.

    Probes as a server binds (with ``SO_REUSEADDR``, as mongod does), so a
    port with a live listener counts as taken and one in TIME_WAIT as free.

    Raises
    ------
    ConfigError
        When none of ``tries`` ports is free.
    """
    for port in range(start, min(start + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise ConfigError(f"No free port among {start}..{start + tries - 1} on {host}; set db_port= to a free one.")
