"""A minimal blocking rtnetlink client over a raw socket (struct + socket only).

The hot path of a pod start is a dozen small netlink requests. Built by hand they cost a few
microseconds of Python each; pyroute2 costs several times that per request and ~130 ms to import
(``bench/netlink.py`` measures both; figures in docs/cni.md). The kernel answers requests
synchronously inside send(), so callers run the slow ones (deleting a veth waits ~20 ms for RCU)
on a thread, never on an event loop.

A dump that the kernel marks inconsistent (``NLM_F_DUMP_INTR``: the table changed while it was
being dumped) is read to its end and asked for again, up to :data:`DUMP_ATTEMPTS` times.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from kvswitch.kernel.netns import sockets_in

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10  # in a dump reply: the dump is inconsistent, ask again
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 1, 3, 4, 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_TABLE = 1, 4, 5, 6, 8, 15
RTAX_MTU = 2
# Multicast groups (bind(2) a socket to them to hear about changes).
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
IFF_UP = 0x1
IFF_NOARP = 0x80
IFLA_AF_SPEC = 26
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
RTPROT_BOOT, RTPROT_STATIC = 3, 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
NLA_F_NESTED = 0x8000

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_ERR = struct.Struct("=i")
DUMP_ATTEMPTS = 10  # pyroute2 retries interrupted dumps too (until a timeout)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    size = _RTATTR.size + len(payload)
    return _RTATTR.pack(size, kind) + payload + b"\0" * (_align(size) - size)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes of one level (first occurrence of each type wins, flags masked off)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _RTATTR.size <= len(data):
        size, kind = _RTATTR.unpack_from(data, pos)
        if size < _RTATTR.size:
            break
        out.setdefault(kind & 0x3FFF, data[pos + _RTATTR.size : pos + size])
        pos += _align(size)
    return out


def _text(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value else ""


@dataclass
class Link:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str
    alias: str

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass
class Addr:
    index: int
    address: str  # "ip/prefixlen"


@dataclass
class RouteEntry:
    family: int
    dst: str  # "net/len"
    gateway: str | None
    oif: int | None
    table: int
    scope: int = RT_SCOPE_UNIVERSE
    protocol: int = 0
    priority: int = 0
    mtu: int | None = None  # the route's mtu metric (RTAX_MTU), None when unset


class DumpInterrupted(OSError):
    """Every attempt of a dump came back marked NLM_F_DUMP_INTR (the table kept changing)."""


class Rtnl:
    """One NETLINK_ROUTE socket (in whatever namespace it was opened in); not thread-safe.

    ``sock``: a netlink socket opened elsewhere (e.g. inside another namespace), or any datagram
    socket speaking the same messages (a test's socketpair; only netlink sockets are bound).
    ``groups``: multicast groups to join, for a socket that listens to changes.
    """

    def __init__(self, sock: socket.socket | None = None, groups: int = 0) -> None:
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        if self.sock.family == socket.AF_NETLINK:
            self.sock.bind((0, groups))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
        """(type, payload) of every message answering ``seq`` until the answer is complete, and
        whether any of them carried NLM_F_DUMP_INTR. Raises the kernel's error as OSError."""
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            data = self.sock.recv(1 << 20)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                size, kind, flags, mseq, _ = _NLMSGHDR.unpack_from(data, pos)
                if size < _NLMSGHDR.size:
                    break
                payload = data[pos + _NLMSGHDR.size : pos + size]
                pos += _align(size)
                if mseq != seq:
                    continue  # the tail of an earlier answer we gave up on
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_ERROR:
                    (err,) = _ERR.unpack_from(payload)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return out, interrupted
                if kind == NLMSG_DONE:
                    return out, interrupted
                out.append((kind, payload))
                if not flags & NLM_F_MULTI:
                    return out, interrupted

    def request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request and read its whole answer; a dump is repeated while it is interrupted."""
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        for _ in range(DUMP_ATTEMPTS if dump else 1):
            self._seq += 1
            header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, self._seq, 0)
            self.sock.send(header + body)
            answer, interrupted = self._answer(self._seq)
            if not (dump and interrupted):
                return answer
        raise DumpInterrupted(
            errno.EINTR, f"netlink dump (type {kind}) interrupted {DUMP_ATTEMPTS} times in a row"
        )

    # --- links --------------------------------------------------------------------------------

    @staticmethod
    def _link(payload: bytes) -> Link:
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
        attrs = parse_attrs(payload[_IFINFOMSG.size :])
        mtu = attrs.get(IFLA_MTU)
        mac = attrs.get(IFLA_ADDRESS) or b""
        return Link(
            index=index,
            name=_text(attrs.get(IFLA_IFNAME)),
            flags=flags,
            mtu=struct.unpack("=I", mtu)[0] if mtu else 0,
            mac=":".join(f"{b:02x}" for b in mac),
            alias=_text(attrs.get(IFLA_IFALIAS)),
        )

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + (
            attr(IFLA_IFNAME, cstr(name)) if name else b""
        )
        try:
            answer = self.request(RTM_GETLINK, 0, body)
        except OSError as exc:
            if exc.errno in (19, 2):  # ENODEV, ENOENT
                return None
            raise
        return self._link(answer[0][1]) if answer else None

    def links(self) -> list[Link]:
        answer = self.request(RTM_GETLINK, NLM_F_DUMP, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        return [self._link(p) for k, p in answer if k == RTM_NEWLINK]

    def create_veth(
        self, name: str, peer: str, peer_netns_fd: int, mtu: int, mac: str | None, peer_mac: str | None
    ) -> None:
        """Create a veth pair whose peer is born in the namespace ``peer_netns_fd``."""
        peer_attrs = [
            attr(IFLA_IFNAME, cstr(peer)),
            attr(IFLA_NET_NS_FD, u32(peer_netns_fd)),
            attr(IFLA_MTU, u32(mtu)),
        ]
        if peer_mac:
            peer_attrs.append(attr(IFLA_ADDRESS, mac_bytes(peer_mac)))
        info = nested(
            IFLA_LINKINFO,
            attr(IFLA_INFO_KIND, b"veth"),
            nested(
                IFLA_INFO_DATA, attr(VETH_INFO_PEER, _IFINFOMSG.pack(0, 0, 0, 0, 0) + b"".join(peer_attrs))
            ),
        )
        body = (
            _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            + attr(IFLA_IFNAME, cstr(name))
            + attr(IFLA_MTU, u32(mtu))
        )
        if mac:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        self.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body + info)

    def set_link(
        self,
        index: int = 0,
        *,
        name: str | None = None,
        up: bool | None = None,
        noarp: bool | None = None,
        mac: str | None = None,
        mtu: int | None = None,
        alias: str | None = None,
        ipv6_addr_gen: bool | None = None,
    ) -> None:
        """Change a link found by ``index`` or, when it is 0, by ``name``."""
        flags = change = 0
        for wanted, bit in ((up, IFF_UP), (noarp, IFF_NOARP)):
            if wanted is not None:
                flags |= bit if wanted else 0
                change |= bit
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if not index and name:
            body += attr(IFLA_IFNAME, cstr(name))
        if mac:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        if mtu is not None:
            body += attr(IFLA_MTU, u32(mtu))
        if alias is not None:
            body += attr(IFLA_IFALIAS, alias.encode())
        if ipv6_addr_gen is not None:
            mode = 0 if ipv6_addr_gen else IN6_ADDR_GEN_MODE_NONE
            inet6 = nested(socket.AF_INET6, attr(IFLA_INET6_ADDR_GEN_MODE, bytes([mode])))
            body += nested(IFLA_AF_SPEC, inet6)
        self.request(RTM_NEWLINK, NLM_F_ACK, body)

    def delete_link(self, name: str) -> bool:
        """False when there was no such link (ENODEV)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(name))
        try:
            self.request(RTM_DELLINK, NLM_F_ACK, body)
        except OSError as exc:
            if exc.errno in (19, 2):
                return False
            raise
        return True

    # --- addresses ----------------------------------------------------------------------------

    @staticmethod
    def _ifaddr(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, index: int) -> bytes:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        packed = address.ip.packed
        flags = IFA_F_NODAD if address.version == 6 else 0
        body = _IFADDRMSG.pack(family, address.network.prefixlen, flags, RT_SCOPE_UNIVERSE, index)
        return body + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)

    def add_address(self, index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        self.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, self._ifaddr(address, index))

    def delete_address(self, index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bool:
        """False when the interface did not hold the address (EADDRNOTAVAIL)."""
        try:
            self.request(RTM_DELADDR, NLM_F_ACK, self._ifaddr(address, index))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
        return True

    def addresses(self, index: int | None = None, family: int = socket.AF_UNSPEC) -> list[Addr]:
        out = []
        for kind, payload in self.request(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
            if kind != RTM_NEWADDR:
                continue
            _, prefixlen, _, _, idx = _IFADDRMSG.unpack_from(payload)
            if index is not None and idx != index:
                continue
            attrs = parse_attrs(payload[_IFADDRMSG.size :])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw:
                out.append(Addr(idx, f"{ipaddress.ip_address(raw)}/{prefixlen}"))
        return out

    # --- routes -------------------------------------------------------------------------------

    @staticmethod
    def _route(
        dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
        gateway: IPAddr | None,
        oif: int,
        scope: int,
        protocol: int,
        mtu: int | None,
    ) -> bytes:
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, 0)
        if dst.prefixlen:
            body += attr(RTA_DST, dst.network_address.packed)
        if gateway is not None:
            body += attr(RTA_GATEWAY, gateway.packed)
        body += attr(RTA_OIF, u32(oif))
        if mtu is not None:
            body += nested(RTA_METRICS, attr(RTAX_MTU, u32(mtu)))
        return body

    def add_route(
        self,
        dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
        gateway: IPAddr | None,
        oif: int,
        scope: int = RT_SCOPE_UNIVERSE,
        *,
        protocol: int = RTPROT_BOOT,
        mtu: int | None = None,
        replace: bool = False,
    ) -> None:
        """Add a route to the main table; EEXIST when one for ``dst`` is there already, unless
        ``replace`` (``ip route replace``: the route for ``dst`` becomes this one)."""
        body = self._route(dst, gateway, oif, scope, protocol, mtu)
        how = NLM_F_REPLACE if replace else NLM_F_EXCL
        self.request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | how, body)

    def delete_route(self, dst: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        """Delete a route for ``dst`` from the main table; False when there was none (ESRCH)."""
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
        if dst.prefixlen:
            body += attr(RTA_DST, dst.network_address.packed)
        try:
            self.request(RTM_DELROUTE, NLM_F_ACK, body)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False
            raise
        return True

    def routes(self, family: int, table: int | None = None) -> list[RouteEntry]:
        """Unicast routes of ``family`` (AF_INET/AF_INET6), of every table or only of ``table``."""
        out = []
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for kind, payload in self.request(RTM_GETROUTE, NLM_F_DUMP, body):
            if kind != RTM_NEWROUTE:
                continue
            fam, dst_len, _, _, rtable, protocol, scope, rtype, _ = _RTMSG.unpack_from(payload)
            attrs = parse_attrs(payload[_RTMSG.size :])
            if RTA_TABLE in attrs:
                rtable = struct.unpack("=I", attrs[RTA_TABLE])[0]
            if rtype != RTN_UNICAST or (table is not None and rtable != table):
                continue
            raw_dst = attrs.get(RTA_DST)
            base = (
                ipaddress.ip_address(raw_dst) if raw_dst else ("0.0.0.0" if fam == socket.AF_INET else "::")
            )
            gw = attrs.get(RTA_GATEWAY)
            oif = attrs.get(RTA_OIF)
            prio = attrs.get(RTA_PRIORITY)
            mtu = parse_attrs(attrs[RTA_METRICS]).get(RTAX_MTU) if RTA_METRICS in attrs else None
            out.append(
                RouteEntry(
                    family=fam,
                    dst=str(ipaddress.ip_network(f"{base}/{dst_len}", strict=False)),
                    gateway=str(ipaddress.ip_address(gw)) if gw else None,
                    oif=struct.unpack("=I", oif)[0] if oif else None,
                    table=rtable,
                    scope=scope,
                    protocol=protocol,
                    priority=struct.unpack("=I", prio)[0] if prio else 0,
                    mtu=struct.unpack("=I", mtu)[0] if mtu else None,
                )
            )
        return out


def open_rtnl(netns: int | str | None = None) -> Rtnl:
    """An rtnetlink socket in ``netns`` (an open fd, a name or a path; None: the caller's)."""
    if netns is None:
        return Rtnl()
    (sock,) = sockets_in(netns, [(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)])
    return Rtnl(sock)
