"""Wait until the node's network is usable: a default route, a global address, names resolving.

Read with pyroute2 (netlink) in the caller's network namespace. "Usable" means all of:

- a default route (IPv4 ``0.0.0.0/0`` or IPv6 ``::/0``) of type unicast in any table other than
  ``local``, through a gateway or an interface (skipped when ``require_default_route`` is false);
- an address of global scope on an interface other than loopback, not tentative (IPv6 DAD still
  running) nor DAD-failed;
- every name in ``resolve`` answers ``getaddrinfo``.

:func:`wait_for_network` polls until all hold or the deadline passes, then raises
:class:`~bootstrap.errors.RegistryError` (exit 3, "registry/network") naming the missing
conditions and what the node has instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from bootstrap.errors import RegistryError

log = logging.getLogger(__name__)

RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
IFF_LOOPBACK = 0x8
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


@dataclass(frozen=True)
class NetworkState:
    """What the node has right now, as human-readable strings.

    ``default_routes``: e.g. ``"default via 198.51.100.1 dev eth0"``. ``addresses``: every
    non-loopback global address, e.g. ``"eth0 198.51.100.2/24"``. ``other_addresses``: the rest
    (loopback, link-local, tentative), for error messages. ``resolved``/``unresolved``: the names
    asked for, split by whether they answered."""

    default_routes: tuple[str, ...]
    addresses: tuple[str, ...]
    other_addresses: tuple[str, ...]
    resolved: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()

    def missing(self, require_default_route: bool) -> list[str]:
        """The unmet conditions, each a short phrase (empty when the network is ready)."""
        reasons = []
        if require_default_route and not self.default_routes:
            reasons.append("no default route")
        if not self.addresses:
            reasons.append("no global non-loopback address")
        if self.unresolved:
            reasons.append(f"cannot resolve {', '.join(self.unresolved)}")
        return reasons

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "default_routes": list(self.default_routes),
            "addresses": list(self.addresses),
            "resolved": list(self.resolved),
        }


def probe(resolve: Sequence[str] = (), *, resolve_timeout: float = 5.0) -> NetworkState:
    """Read routes and addresses over netlink and try to resolve ``resolve`` (each name given at
    most ``resolve_timeout`` seconds). Never raises for a missing condition; raises
    :class:`RegistryError` only when netlink itself fails."""
    try:
        with IPRoute() as ipr:
            links = {
                link["index"]: (link.get_attr("IFLA_IFNAME") or str(link["index"]), link["flags"])
                for link in ipr.get_links()
            }
            routes = _default_routes(ipr.get_routes(), links)
            good, other = _addresses(ipr.get_addr(), links)
    except OSError as exc:
        raise RegistryError(
            f"cannot read routes and addresses over netlink: {exc}",
            "is this a Linux host with rtnetlink available?",
        ) from exc
    resolved: list[str] = []
    unresolved: list[str] = []
    for name in resolve:
        (resolved if _resolves(name, resolve_timeout) else unresolved).append(name)
    return NetworkState(routes, good, other, tuple(resolved), tuple(unresolved))


def wait_for_network(
    timeout: float,
    *,
    require_default_route: bool = True,
    resolve: Sequence[str] = (),
    interval: float = 0.5,
) -> NetworkState:
    """Poll :func:`probe` every ``interval`` seconds until the network is ready; return its state.

    At the deadline (``timeout`` seconds after the call; the first probe always happens) raises
    :class:`RegistryError` (exit 3) whose message lists the missing conditions and the node's
    routes and addresses, e.g. ``network not ready after 30s: no default route; addresses:
    eth0 198.51.100.2/24``.
    """
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while True:
        remaining = max(0.5, deadline - time.monotonic())
        state = probe(resolve, resolve_timeout=min(5.0, remaining))
        missing = state.missing(require_default_route)
        if not missing:
            log.info(
                "network ready: %s; %s",
                ", ".join(state.default_routes) or "no default route (not required)",
                ", ".join(state.addresses),
            )
            return state
        now = time.monotonic()
        if now >= deadline:
            raise RegistryError(
                f"network not ready after {timeout:g}s: {'; '.join(missing)}; {_describe(state)}",
                "check the node's network configuration (ip route, ip addr, /etc/resolv.conf) "
                "or raise network.timeout in the node manifest",
            )
        if now - last_log >= 10:
            log.info("waiting for the network: %s", "; ".join(missing))
            last_log = now
        time.sleep(min(interval, max(0.0, deadline - now)))


def _describe(state: NetworkState) -> str:
    routes = ", ".join(state.default_routes) or "none"
    addrs = ", ".join(state.addresses + state.other_addresses) or "none"
    return f"default routes: {routes}; addresses: {addrs}"


def _default_routes(routes: Any, links: dict[int, tuple[str, int]]) -> tuple[str, ...]:
    found = []
    for r in routes:
        if r["dst_len"] != 0 or r["type"] != RTN_UNICAST:
            continue
        table = r.get_attr("RTA_TABLE") or r["table"]
        if table == RT_TABLE_LOCAL:
            continue
        hops = []
        gateway, oif = r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF")
        if gateway or oif:
            hops.append((gateway, oif))
        for hop in r.get_attr("RTA_MULTIPATH") or ():
            hops.append((hop.get_attr("RTA_GATEWAY"), hop["oif"]))
        for gw, dev in hops:
            text = "default"
            if gw:
                text += f" via {gw}"
            if dev:
                text += f" dev {links.get(dev, (str(dev), 0))[0]}"
            found.append(text)
    return tuple(found)


def _addresses(addrs: Any, links: dict[int, tuple[str, int]]) -> tuple[tuple[str, ...], ...]:
    good: list[str] = []
    other: list[str] = []
    for a in addrs:
        name, flags = links.get(a["index"], (str(a["index"]), 0))
        text = f"{name} {a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
        ifa_flags = a.get_attr("IFA_FLAGS") or a["flags"]
        usable = (
            a["scope"] == RT_SCOPE_UNIVERSE
            and not flags & IFF_LOOPBACK
            and not ifa_flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
        )
        (good if usable else other).append(text)
    return tuple(good), tuple(other)


def _resolves(name: str, timeout: float) -> bool:
    """True when ``getaddrinfo(name)`` answers within ``timeout``; the lookup runs in a daemon
    thread because the resolver cannot be interrupted."""
    result: list[bool] = []

    def lookup() -> None:
        try:
            result.append(bool(socket.getaddrinfo(name, None)))
        except (OSError, UnicodeError):
            result.append(False)

    worker = threading.Thread(target=lookup, name=f"resolve {name}", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
