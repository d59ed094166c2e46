"""Idempotent verbs for a node's host networking: gateway address, on-link routes, forwarding.

Every ``ensure_*``/``remove_*`` verb reads the kernel's state first and writes only what differs,
so calling it again changes nothing (no netlink request that modifies anything, hence no
notification to listeners such as ovs-vswitchd's route table); each returns whether it changed
something. They take an open :class:`~kvswitch.kernel.rtnl.Rtnl` of the namespace to act in.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from kvswitch.kernel.netns import read_sysctl, write_sysctl
from kvswitch.kernel.rtnl import RT_SCOPE_LINK, RT_TABLE_MAIN, RTPROT_STATIC, Link, RouteEntry, Rtnl

log = logging.getLogger(__name__)


def _link(rtnl: Rtnl, ifname: str) -> Link:
    link = rtnl.link(ifname)
    if link is None:
        raise LookupError(f"interface {ifname} not found")
    return link


def ensure_gateway(rtnl: Rtnl, ifname: str, cidr: str, mac: str, mtu: int) -> bool:
    """``ifname`` is up with MAC ``mac``, MTU ``mtu`` and ``cidr`` as its only IPv4 address."""
    want = ipaddress.IPv4Interface(cidr)
    link = _link(rtnl, ifname)
    changed = False
    new_mac = mac.lower() if link.mac != mac.lower() else None
    new_mtu = mtu if link.mtu != mtu else None
    if new_mac or new_mtu is not None:
        rtnl.set_link(link.index, mac=new_mac, mtu=new_mtu)
        changed = True
    have = {a.address for a in rtnl.addresses(link.index, socket.AF_INET)}
    stale = have - {str(want)}
    for address in sorted(stale):
        rtnl.delete_address(link.index, ipaddress.IPv4Interface(address))
        changed = True
    if stale:  # deleting a primary address can take its secondaries with it: look again
        have = {a.address for a in rtnl.addresses(link.index, socket.AF_INET)}
    if str(want) not in have:
        rtnl.add_address(link.index, want)
        changed = True
    if not link.up:
        rtnl.set_link(link.index, up=True)
        changed = True
    return changed


def _main_routes(rtnl: Rtnl, net: ipaddress.IPv4Network) -> list[RouteEntry]:
    return [r for r in rtnl.routes(socket.AF_INET, RT_TABLE_MAIN) if r.dst == str(net)]


def ensure_route(rtnl: Rtnl, cidr: str, ifname: str, mtu: int) -> bool:
    """An on-link route for ``cidr`` out of ``ifname`` with route MTU ``mtu`` (main table).

    On-link: the gateway's ARP responder answers the host for every address in ``cidr``.
    """
    net = ipaddress.IPv4Network(cidr)
    index = _link(rtnl, ifname).index
    for route in _main_routes(rtnl, net):
        if (route.oif, route.gateway, route.scope, route.mtu, route.priority) == (
            index,
            None,
            RT_SCOPE_LINK,
            mtu,
            0,
        ):
            return False
    rtnl.add_route(net, None, index, RT_SCOPE_LINK, protocol=RTPROT_STATIC, mtu=mtu, replace=True)
    return True


def remove_route(rtnl: Rtnl, cidr: str) -> bool:
    """No route for ``cidr`` is left in the main table."""
    net = ipaddress.IPv4Network(cidr)
    changed = False
    for _ in _main_routes(rtnl, net):
        changed |= rtnl.delete_route(net)
    return changed


def routes(rtnl: Rtnl) -> list[str]:
    """Destinations ("net/len") of the IPv4 main table's unicast routes, default route excluded."""
    return [r.dst for r in rtnl.routes(socket.AF_INET, RT_TABLE_MAIN) if not r.dst.endswith("/0")]


def interface_mtu_for(rtnl: Rtnl, ip: str) -> int | None:
    """MTU of the interface that holds ``ip`` (e.g. the underlay address), None when none does."""
    want = ipaddress.ip_address(ip)
    family = socket.AF_INET if want.version == 4 else socket.AF_INET6
    for addr in rtnl.addresses(family=family):
        if ipaddress.ip_interface(addr.address).ip == want:
            link = rtnl.link(index=addr.index)
            return link.mtu if link is not None else None
    return None


def ensure_no_redirects(netns: int | str | None, ifname: str) -> bool:
    """No ICMP redirects out of ``ifname``: OVS routes by IP, and a redirect (the kernel sends one
    whenever it forwards a packet back out the interface it came in, as with kube-proxy's DNAT) uses
    up the destination's ICMP rate limit, starving the errors that matter (a reject, fragmentation
    needed). The kernel sends them if either ``all`` or the interface's setting is on."""
    changed = False
    for key in ("net.ipv4.conf.all.send_redirects", f"net.ipv4.conf.{ifname}.send_redirects"):
        if read_sysctl(netns, key) != "0":
            try:
                write_sysctl(netns, key, "0")
            except OSError as exc:  # /proc/sys is read-only in an unprivileged pod
                log.warning("cannot set %s=0 (%s): set it on the node (docs/install.md)", key, exc)
                continue
            changed = True
    return changed


def ensure_forwarding(netns: int | str | None = None) -> bool:
    """IPv4 forwarding is on in ``netns`` (None: ours). Written only when off: /proc/sys may be
    read-only where forwarding is a prerequisite the node already meets."""
    if read_sysctl(netns, "net.ipv4.ip_forward") == "1":
        return False
    write_sysctl(netns, "net.ipv4.ip_forward", "1")
    return True
