"""The kernel layer: idempotent host verbs in real namespaces, the setns helper, dump retries.

"Idempotent" is checked against the kernel itself: a socket in the namespace listens to the
link, IPv4 address and IPv4 route multicast groups, and a second call must not make the kernel
announce any change (a write that sets the same value would still be announced).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from kvswitch_testbed import TestBed
from kvswitch_testbed.netns import create_netns, run, sysctl

from kvswitch.kernel import host
from kvswitch.kernel.netns import (
    NETNS_DIR,
    NotANetworkNamespace,
    in_netns,
    netns_path,
    open_netns,
    read_sysctl,
    sockets_in,
)
from kvswitch.kernel.rtnl import (
    DUMP_ATTEMPTS,
    IFLA_IFNAME,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    RT_SCOPE_LINK,
    RT_TABLE_MAIN,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_LINK,
    DumpInterrupted,
    Rtnl,
    attr,
    cstr,
    open_rtnl,
)
from kvswitch.node.host import HostNetwork

GW_IF = "gw0"
GW_MAC = "0a:58:0a:f4:00:01"
GW_CIDR = "10.244.1.1/24"
CLUSTER = "10.244.0.0/16"


@pytest.fixture
def node(bed: TestBed) -> Iterator[str]:
    """A namespace with a veth pair (gw0 / gw0p, peer up so gw0 gets a carrier), IPv6 off."""
    ns = f"{bed.prefix}-kernel"
    create_netns(ns)
    sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
    sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
    run(["ip", "link", "add", GW_IF, "type", "veth", "peer", "name", "gw0p"], ns)
    run(["ip", "link", "set", "gw0p", "up"], ns)
    yield ns  # the bed fixture deletes the namespace (and with it the veth) and checks for leaks


class Listener:
    """Kernel change notifications (links, IPv4 addresses, IPv4 routes) of one namespace."""

    def __init__(self, ns: str) -> None:
        (sock,) = sockets_in(ns, [(socket.AF_NETLINK, socket.SOCK_RAW, 0)])
        self.rtnl = Rtnl(sock, groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE)

    def drain(self, quiet: float = 0.2) -> list[int]:
        """Message types received until nothing arrived for ``quiet`` seconds."""
        types = []
        while select.select([self.rtnl.sock], [], [], quiet)[0]:
            data = self.rtnl.sock.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, pos)
                types.append(kind)
                pos += (size + 3) & ~3
        return types

    def close(self) -> None:
        self.rtnl.close()


@pytest.fixture
def listener(node: str) -> Iterator[Listener]:
    lst = Listener(node)
    yield lst
    lst.close()


def gw_state(rtnl: Rtnl) -> tuple[str, int, bool, list[str]]:
    link = rtnl.link(GW_IF)
    assert link is not None
    return link.mac, link.mtu, link.up, [a.address for a in rtnl.addresses(link.index, socket.AF_INET)]


class TestHostVerbs:
    def test_ensure_gateway_converges_then_changes_nothing(self, node: str, listener: Listener) -> None:
        run(["ip", "addr", "add", "10.99.0.5/24", "dev", GW_IF], node)  # a stale address to remove
        with open_rtnl(node) as rtnl:
            assert host.ensure_gateway(rtnl, GW_IF, GW_CIDR, GW_MAC.upper(), 1450) is True
            assert gw_state(rtnl) == (GW_MAC, 1450, True, [GW_CIDR])
            assert listener.drain()  # the first call did change things, and the listener hears it

            assert host.ensure_gateway(rtnl, GW_IF, GW_CIDR, GW_MAC, 1450) is False
            assert listener.drain() == []
            assert gw_state(rtnl) == (GW_MAC, 1450, True, [GW_CIDR])

            assert host.ensure_gateway(rtnl, GW_IF, GW_CIDR, GW_MAC, 1400) is True  # only the MTU differs
            assert listener.drain() != []
            assert gw_state(rtnl) == (GW_MAC, 1400, True, [GW_CIDR])

    def test_ensure_gateway_of_a_missing_interface_is_a_lookup_error(self, node: str) -> None:
        with open_rtnl(node) as rtnl, pytest.raises(LookupError, match="nosuch"):
            host.ensure_gateway(rtnl, "nosuch", GW_CIDR, GW_MAC, 1450)

    def test_ensure_route_and_remove_route_are_idempotent(self, node: str, listener: Listener) -> None:
        with open_rtnl(node) as rtnl:
            host.ensure_gateway(rtnl, GW_IF, GW_CIDR, GW_MAC, 1450)
            link = rtnl.link(GW_IF)
            assert link is not None
            index = link.index

            def cluster_routes() -> list[tuple[int | None, int, int | None, str | None]]:
                return [
                    (r.oif, r.scope, r.mtu, r.gateway)
                    for r in rtnl.routes(socket.AF_INET, RT_TABLE_MAIN)
                    if r.dst == CLUSTER
                ]

            assert host.ensure_route(rtnl, CLUSTER, GW_IF, 1450) is True
            assert cluster_routes() == [(index, RT_SCOPE_LINK, 1450, None)]
            assert CLUSTER in host.routes(rtnl)
            listener.drain()

            assert host.ensure_route(rtnl, CLUSTER, GW_IF, 1450) is False
            assert listener.drain() == []

            assert host.ensure_route(rtnl, CLUSTER, GW_IF, 1400) is True  # replaced, not added
            assert cluster_routes() == [(index, RT_SCOPE_LINK, 1400, None)]
            listener.drain()

            assert host.remove_route(rtnl, CLUSTER) is True
            assert cluster_routes() == [] and CLUSTER not in host.routes(rtnl)
            assert listener.drain() != []
            assert host.remove_route(rtnl, CLUSTER) is False
            assert listener.drain() == []

    def test_interface_mtu_for_finds_the_interface_holding_an_address(self, node: str) -> None:
        with open_rtnl(node) as rtnl:
            host.ensure_gateway(rtnl, GW_IF, GW_CIDR, GW_MAC, 1432)
            assert host.interface_mtu_for(rtnl, GW_CIDR.split("/")[0]) == 1432
            assert host.interface_mtu_for(rtnl, "10.244.1.2") is None

    def test_ensure_forwarding_writes_only_when_off_and_only_in_that_namespace(self, node: str) -> None:
        root_before = read_sysctl(None, "net.ipv4.ip_forward")
        sysctl(node, "net.ipv4.ip_forward", "0")
        assert host.ensure_forwarding(node) is True
        assert run(["sysctl", "-n", "net.ipv4.ip_forward"], node).stdout.strip() == "1"
        assert host.ensure_forwarding(node) is False
        assert read_sysctl(None, "net.ipv4.ip_forward") == root_before

    def test_host_network_facade_runs_the_verbs_in_its_namespace(self, node: str, listener: Listener) -> None:
        net = HostNetwork(node)
        assert net.ensure_gateway(GW_IF, GW_CIDR, GW_MAC, 1450) is True
        assert net.ensure_route(CLUSTER, GW_IF, 1450) is True
        assert net.ensure_forwarding() in (True, False)
        listener.drain()
        assert net.ensure_gateway(GW_IF, GW_CIDR, GW_MAC, 1450) is False
        assert net.ensure_route(CLUSTER, GW_IF, 1450) is False
        assert net.ensure_forwarding() is False
        assert listener.drain() == []
        assert net.interface_mtu_for("10.244.1.1") == 1450
        assert CLUSTER in net.routes()
        assert net.remove_route(CLUSTER) is True and net.remove_route(CLUSTER) is False
        assert run(["ip", "-4", "route", "show", CLUSTER], node).stdout.strip() == ""
        assert "10.244.1.1/24" in run(["ip", "-4", "addr", "show", GW_IF], node).stdout


class TestNetns:
    def test_paths(self) -> None:
        assert NETNS_DIR.as_posix() == "/var/run/netns"
        assert netns_path("x") == "/var/run/netns/x"
        assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"

    def test_in_netns_by_name_path_and_fd(self, node: str) -> None:
        def links() -> set[str]:
            with Rtnl() as rtnl:  # opened on the thread, so in whatever namespace it entered
                return {link.name for link in rtnl.links()}

        expected = {"lo", GW_IF, "gw0p"}
        assert in_netns(node, links) == expected
        assert in_netns(netns_path(node), links) == expected
        fd = open_netns(netns_path(node))
        try:
            assert in_netns(fd, links) == expected
        finally:
            os.close(fd)
        assert GW_IF not in in_netns(None, links)  # None: right here, in our namespace

    def test_in_netns_reraises_and_open_netns_refuses_other_files(self, node: str) -> None:
        with pytest.raises(ZeroDivisionError):
            in_netns(node, lambda: 1 // 0)
        with pytest.raises(FileNotFoundError):
            in_netns(f"{node}-missing", lambda: None)
        with pytest.raises(FileNotFoundError):
            open_netns(netns_path(f"{node}-missing"))
        with pytest.raises(NotANetworkNamespace):
            open_netns("/proc/self/ns/uts")
        with pytest.raises(NotANetworkNamespace):
            open_netns("/etc/hostname")

    def test_sockets_in_is_all_or_nothing(self, node: str) -> None:
        before = len(os.listdir("/proc/self/fd"))
        bad_proto = (socket.AF_INET, socket.SOCK_DGRAM, 9999)
        with pytest.raises(OSError):
            sockets_in(node, [(socket.AF_INET, socket.SOCK_DGRAM, 0), bad_proto])
        assert len(os.listdir("/proc/self/fd")) == before  # the first socket was closed


# --- interrupted dumps, against a scripted peer on a datagram socketpair ----------------------


def newlink(seq: int, index: int, name: str, flags: int) -> bytes:
    payload = struct.pack("=BxHiII", 0, 0, index, 0, 0) + attr(IFLA_IFNAME, cstr(name))
    return struct.pack("=IHHII", 16 + len(payload), RTM_NEWLINK, flags, seq, 0) + payload


def done(seq: int, flags: int) -> bytes:
    return struct.pack("=IHHII", 20, NLMSG_DONE, flags, seq, 0) + struct.pack("=i", 0)


class ScriptedKernel:
    """Answers each link dump request with the next script entry: (link names, interrupted)."""

    def __init__(self, script: list[tuple[list[str], bool]]) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.script = script
        self.requests: list[tuple[int, int, int]] = []  # (type, flags, seq)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for names, interrupted in self.script:
            request = self.theirs.recv(1 << 16)
            _, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
            self.requests.append((kind, flags, seq))
            intr = NLM_F_DUMP_INTR if interrupted else 0
            # A leftover of an earlier request first: the client must skip other sequence numbers.
            self.theirs.send(newlink(seq - 1, 99, "stale", NLM_F_MULTI))
            msgs = [newlink(seq, i + 1, n, NLM_F_MULTI | intr) for i, n in enumerate(names)]
            self.theirs.send(b"".join(msgs))  # one datagram can carry several messages
            self.theirs.send(done(seq, NLM_F_MULTI | intr))

    def close(self) -> None:
        self.thread.join(timeout=5)
        self.ours.close()
        self.theirs.close()


class TestDumpRetry:
    def test_an_interrupted_dump_is_read_to_its_end_and_asked_again(self) -> None:
        kernel = ScriptedKernel([(["old0", "old1"], True), (["eth0", "eth1"], False)])
        try:
            links = Rtnl(kernel.ours).links()
        finally:
            kernel.close()
        assert [link.name for link in links] == ["eth0", "eth1"]
        assert [k for k, _, _ in kernel.requests] == [RTM_GETLINK, RTM_GETLINK]
        first, second = (seq for _, _, seq in kernel.requests)
        assert second == first + 1

    def test_a_dump_interrupted_every_time_fails_after_the_last_attempt(self) -> None:
        kernel = ScriptedKernel([(["eth0"], True)] * DUMP_ATTEMPTS)
        try:
            with pytest.raises(DumpInterrupted) as info:
                Rtnl(kernel.ours).links()
        finally:
            kernel.close()
        assert len(kernel.requests) == DUMP_ATTEMPTS
        assert isinstance(info.value, OSError) and info.value.errno == 4  # EINTR: callers map OSError

    def test_a_real_dump_in_a_namespace_still_works(self, node: str) -> None:
        with open_rtnl(node) as rtnl:
            assert {link.name for link in rtnl.links()} == {"lo", GW_IF, "gw0p"}
