"""The CNI's side of the kernel layer: an attachment's veth, addresses and routes, CNI errors.

The netlink work itself is :mod:`kvswitch.kernel` (rtnetlink, namespaces, ethtool); this module
puts an attachment's steps together and turns kernel failures into CNI error codes. Everything
here blocks (netlink requests are answered synchronously by the kernel) and is meant to run on a
worker thread. Sockets for the pod's namespace are opened by a short-lived thread that setns(2)s
into it (:func:`kvswitch.kernel.netns.sockets_in`), so no thread of the caller ever moves.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field

from kvswitch.cni.result import IPAddress, IPInterface, Route
from kvswitch.cni.spec import CniError, Code
from kvswitch.kernel.ethtool import tx_checksum_off
from kvswitch.kernel.netns import NotANetworkNamespace, open_netns, sockets_in
from kvswitch.kernel.rtnl import RT_SCOPE_LINK, RT_TABLE_MAIN, Rtnl
from kvswitch.kernel.rtnl import open_rtnl as open_rtnl


class Netns:
    """An open network namespace file, e.g. CNI_NETNS; the fd pins the namespace while we work."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = open_netns(path)
        except FileNotFoundError:
            raise CniError(
                Code.UNKNOWN_CONTAINER, "the container's network namespace does not exist", path
            ) from None
        except NotANetworkNamespace:
            raise CniError(Code.INVALID_ENV, "CNI_NETNS is not a network namespace", path) from None
        except OSError as exc:
            raise CniError(Code.IO_FAILURE, "cannot open the network namespace", f"{path}: {exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kernel_error(what: str, exc: OSError) -> CniError:
    return CniError(Code.KERNEL_FAILED, what, f"{os.strerror(exc.errno or 0)} (errno {exc.errno})")


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def mac_from_ip(ip: IPAddress) -> str:
    """``0a:58:`` + the last four bytes of the address: stable per IP, locally administered."""
    return "0a:58:" + ":".join(f"{x:02x}" for x in ip.packed[-4:])


def delete_link(host: Rtnl, name: str) -> bool:
    """Delete ``name`` (a veth takes its peer with it); False when it did not exist. Slow (RCU)."""
    try:
        return host.delete_link(name)
    except OSError as exc:
        raise kernel_error(f"cannot delete interface {name}", exc) from None


def create_veth(
    host: Rtnl, host_if: str, pod_if: str, pod_ns: Netns, mtu: int, host_mac: str, pod_mac: str | None
) -> None:
    """Create the pair with the peer born in the pod namespace under its final name.

    A leftover host end of the same attachment (a crashed earlier ADD) is replaced; a pod-side
    name that is taken means CNI_IFNAME is unusable, which the spec says must be an error.
    """
    for attempt in range(2):
        try:
            host.create_veth(host_if, pod_if, pod_ns.fd, mtu, host_mac, pod_mac)
            return
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise kernel_error(f"cannot create veth {host_if}/{pod_if}", exc) from None
            if attempt == 0 and host.link(host_if) is not None:
                delete_link(host, host_if)
                continue
            raise CniError(
                Code.INVALID_ENV,
                f"CNI_IFNAME {pod_if} already exists in the container's network namespace",
                pod_ns.path,
            ) from None


def host_side_up(host: Rtnl, host_if: str, alias: str) -> None:
    """Bring the host end up as a bare wire into OVS, and label it.

    The userspace datapath reads the veth with a packet socket, so the node's kernel sees the
    pod's broadcasts too: without NOARP it would answer ARP for the node's own addresses (e.g. a
    gateway address) behind the flows' back, and without an IPv6 link-local address it sends no
    IPv6 chatter of its own. The alias lets GC attribute a veth whose port is gone.
    """
    try:
        host.set_link(name=host_if, up=True, noarp=True, alias=alias, ipv6_addr_gen=False)
    except OSError as exc:
        raise kernel_error(f"cannot bring up {host_if}", exc) from None


def configure_pod(
    pod_ns: Netns,
    ifname: str,
    mac: str | None,
    addresses: list[IPInterface],
    routes: list[Route],
) -> None:
    """Inside the pod: tx checksum off, MAC, up, addresses, routes (off-subnet gateways on-link)."""
    nl_sock, ioctl_sock = sockets_in(
        pod_ns.fd, [(socket.AF_NETLINK, socket.SOCK_RAW, 0), (socket.AF_INET, socket.SOCK_DGRAM, 0)]
    )
    with Rtnl(nl_sock) as pod, ioctl_sock:
        try:
            link = pod.link(ifname)
            if link is None:
                raise CniError(Code.KERNEL_FAILED, f"{ifname} vanished from the container's namespace")
            tx_checksum_off(ioctl_sock, ifname)
            pod.set_link(link.index, up=True, mac=mac)
            for address in addresses:
                pod.add_address(link.index, address)
            on_link = [a.network for a in addresses]
            for route in routes:
                gw = route.gw
                if gw is not None and not any(gw in net for net in on_link if net.version == gw.version):
                    host_route = ipaddress.ip_network(f"{gw}/{gw.max_prefixlen}")
                    pod.add_route(host_route, None, link.index, RT_SCOPE_LINK)
                    on_link.append(host_route)
                pod.add_route(route.dst, gw, link.index)
        except OSError as exc:
            raise kernel_error(f"cannot configure {ifname} in {pod_ns.path}", exc) from None


def route_device_mtu(host: Rtnl, device: str | None) -> int | None:
    """MTU of ``device``, or of the device holding the default route; None when there is none."""
    try:
        if device is not None:
            link = host.link(device)
            if link is None:
                raise CniError(Code.INVALID_CONFIG, f"underlayInterface {device} does not exist on this node")
            return link.mtu
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in host.routes(family, RT_TABLE_MAIN):
                if route.dst.endswith("/0") and route.oif:
                    found = host.link(index=route.oif)
                    if found is not None:
                        return found.mtu
    except OSError as exc:
        raise kernel_error("cannot read the underlay MTU", exc) from None
    return None


@dataclass
class PodInterface:
    """What CHECK compares against prevResult."""

    mac: str
    mtu: int
    up: bool
    addresses: set[str] = field(default_factory=set)
    routes: set[tuple[str, str | None]] = field(default_factory=set)


def inspect_pod(pod_ns: Netns, ifname: str) -> PodInterface | None:
    (nl_sock,) = sockets_in(pod_ns.fd, [(socket.AF_NETLINK, socket.SOCK_RAW, 0)])
    with Rtnl(nl_sock) as pod:
        try:
            link = pod.link(ifname)
            if link is None:
                return None
            state = PodInterface(mac=link.mac, mtu=link.mtu, up=link.up)
            state.addresses = {a.address for a in pod.addresses(link.index)}
            for family in (socket.AF_INET, socket.AF_INET6):
                state.routes |= {(r.dst, r.gateway) for r in pod.routes(family, RT_TABLE_MAIN)}
            return state
        except OSError as exc:
            raise kernel_error(f"cannot inspect {ifname} in {pod_ns.path}", exc) from None


def links_with_alias(host: Rtnl, prefix: str) -> dict[str, str]:
    """Host interfaces whose alias starts with ``prefix``: name -> alias."""
    try:
        return {link.name: link.alias for link in host.links() if link.alias.startswith(prefix)}
    except OSError as exc:
        raise kernel_error("cannot list interfaces", exc) from None


def link_state(host: Rtnl, name: str) -> tuple[bool, bool]:
    """(exists, is up) of a host interface."""
    try:
        link = host.link(name)
    except OSError as exc:
        raise kernel_error(f"cannot look up {name}", exc) from None
    return (link is not None, link is not None and link.up)
