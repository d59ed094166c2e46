"""Kernel side of an attachment: namespaces, the veth pair, addresses, routes, one ethtool ioctl.

Everything here blocks (netlink requests are answered synchronously by the kernel) and is meant
to run on a worker thread. Sockets for another network namespace are opened by a short-lived
thread that setns(2)s into it: a socket stays in the namespace it was created in, so no thread
of the caller ever moves (pyroute2's ``netns=`` forks a process per socket instead).
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvswitch.cni.result import IPAddress, IPInterface, Route
from kvswitch.cni.rtnl import RT_SCOPE_LINK, RT_TABLE_MAIN, Rtnl
from kvswitch.cni.spec import CniError, Code

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
ALIAS_PREFIX = "k-vswitch-cni"
_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """An open network namespace file, e.g. CNI_NETNS; the fd pins the namespace while we work."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CniError(
                Code.UNKNOWN_CONTAINER, "the container's network namespace does not exist", path
            ) from None
        except OSError as exc:
            raise CniError(Code.IO_FAILURE, "cannot open the network namespace", f"{path}: {exc}") from None
        try:
            nstype = fcntl.ioctl(self.fd, NS_GET_NSTYPE)
        except OSError:
            nstype = -1
        if nstype != CLONE_NEWNET:
            os.close(self.fd)
            raise CniError(Code.INVALID_ENV, "CNI_NETNS is not a network namespace", path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sockets_in(netns_fd: int, specs: Iterable[tuple[int, int, int]]) -> list[socket.socket]:
    """Open sockets (family, type, proto) inside the namespace ``netns_fd``."""
    out: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_open() -> None:
        try:
            if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            out.extend(socket.socket(*spec) for spec in specs)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=enter_and_open, name="kvs-cni-setns")
    thread.start()
    thread.join()
    if failure:
        for s in out:
            s.close()
        raise failure[0]
    return out


def open_rtnl(netns_fd: int | None = None) -> Rtnl:
    """An rtnetlink socket in the namespace ``netns_fd`` (None: the caller's)."""
    if netns_fd is None:
        return Rtnl()
    (sock,) = sockets_in(netns_fd, [(socket.AF_NETLINK, socket.SOCK_RAW, 0)])
    return Rtnl(sock)


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


def tx_checksum_off(sock: socket.socket, ifname: str) -> None:
    """``ethtool -K IFNAME tx off``: OVS's userspace datapath does not fill in offloaded checksums."""
    value = array.array("I", [ETHTOOL_STXCSUM, 0])
    ifr = struct.pack("16sP", ifname.encode(), value.buffer_info()[0])
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)


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
            for route in host.routes(family):
                if route.table == RT_TABLE_MAIN and route.dst.endswith("/0") and route.oif:
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
                state.routes |= {(r.dst, r.gateway) for r in pod.routes(family) if r.table == RT_TABLE_MAIN}
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
