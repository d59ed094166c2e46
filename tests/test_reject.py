"""kvswitch.ovs.reject against a real ovs-vswitchd: a pod's TCP, UDP and SCTP to a Service without
endpoints is refused at once (TCP RST / ICMP port unreachable), seen by the pod's own sockets.

Topology: one node (its own OVS, userspace datapath) with bridge ``br-rej``; pods wired into it by
veth. The flows mimic the service proxy: IP goes through conntrack, a new connection to
10.96.0.10 on a rejected port meets :data:`REJECT_ACTION`. Pods reach 10.96.0.0/12 through a
gateway address that exists only as a static neighbour entry, so no ARP is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kvswitch_testbed import Node, Pod, TestBed
from kvswitch_testbed.netns import CommandError, netns_socket, run
from kvswitch_testbed.sctp import IPPROTO_SCTP, init_packet

from kvswitch.ovs.flows import Canonicalizer, Flow
from kvswitch.ovs.reject import REJECT_ACTION, USERDATA, RejectResponder, reject_reply

BR = "br-rej"
GW_IP, GW_MAC = "10.9.0.1", "02:6b:00:00:00:01"
SVC = "10.96.0.10"
OTHER_USERDATA_ACTION = "controller(userdata=6b.76.73.2d.6f.74.68.72)"  # another component's tag
PLAIN_CONTROLLER_ACTION = "CONTROLLER:65535"  # no userdata at all

FLOWS = [
    "table=0,priority=10,ip actions=ct(table=10,zone=1)",
    "table=0,priority=0 actions=drop",
    f"table=10,priority=100,ct_state=+new+trk,tcp,nw_dst={SVC},tp_dst=80 actions={REJECT_ACTION}",
    f"table=10,priority=100,ct_state=+new+trk,udp,nw_dst={SVC},tp_dst=53 actions={REJECT_ACTION}",
    f"table=10,priority=100,ct_state=+new+trk,sctp,nw_dst={SVC},tp_dst=9 actions={REJECT_ACTION}",
    f"table=10,priority=100,ct_state=+new+trk,tcp,nw_dst={SVC},tp_dst=81 actions={OTHER_USERDATA_ACTION}",
    f"table=10,priority=100,ct_state=+new+trk,tcp,nw_dst={SVC},tp_dst=82 actions={PLAIN_CONTROLLER_ACTION}",
    "table=10,priority=0 actions=drop",
]


@dataclass
class Rig:
    bed: TestBed
    node: Node
    pods: list[Pod]

    def install_flows(self) -> None:
        self.node.ovs.ofctl("add-flows", BR, "-", input="\n".join(FLOWS) + "\n")

    def responder(self, **kwargs: Any) -> RejectResponder:
        return RejectResponder(BR, self.node.ovs.workdir, **kwargs)


def _add_pod(bed: TestBed, node: Node, index: int) -> Pod:
    pod = bed.add_pod(node, f"r{index}")
    bed.plug(pod, BR, f"10.9.0.{10 + index}/24", mac=f"02:6b:00:00:01:{index:02x}")
    run(["ip", "neigh", "replace", GW_IP, "lladdr", GW_MAC, "dev", "eth0", "nud", "permanent"], pod.netns)
    run(["ip", "route", "add", "10.96.0.0/12", "via", GW_IP], pod.netns)
    return pod


def _make_rig(
    bed: TestBed, node: Node | None = None, pods: int = 1, protocols: str = "OpenFlow10,OpenFlow13,OpenFlow15"
) -> Rig:
    """A bridge on ``node`` (a new node by default) with ``pods`` pods; flows when it speaks 1.5."""
    node = node or bed.add_node()
    node.ovs.vsctl(
        "add-br", BR, "--", "set", "bridge", BR, "datapath_type=netdev", "fail_mode=secure",
        f"protocols={protocols}",
    )  # fmt: skip
    node.ovs.wait_bridge(BR)
    rig = Rig(bed, node, [_add_pod(bed, node, i) for i in range(pods)])
    if "OpenFlow15" in protocols:
        rig.install_flows()
    return rig


@pytest.fixture
def rig(bed: TestBed) -> Rig:
    return _make_rig(bed)


@contextlib.asynccontextmanager
async def serving(responder: RejectResponder, connect: bool = True) -> AsyncIterator[RejectResponder]:
    task = asyncio.create_task(responder.run())
    try:
        if connect:
            await responder.wait_connected(5)
        yield responder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- probes from inside a pod ----------------------------------------------------------------
async def tcp_connect(pod: Pod, port: int, timeout: float = 1.0) -> tuple[str, float]:
    """('refused' | 'timeout' | 'connected', seconds) for a real TCP connect() from the pod."""
    sock = netns_socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (SVC, port)), timeout)
        return "connected", time.perf_counter() - start
    except ConnectionRefusedError:
        return "refused", time.perf_counter() - start
    except TimeoutError:
        return "timeout", time.perf_counter() - start
    finally:
        sock.close()


def _ones_sum(data: bytes) -> int:
    """16-bit one's-complement sum, written here independently of the module under test."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum_ok(data: bytes) -> bool:
    """A correctly checksummed range sums to 0xffff."""
    return _ones_sum(data) == 0xFFFF


def tcp_segment(
    src: str, sport: int, seq: int, ack: int, flags: int, payload: bytes = b"", dport: int = 80
) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = (
        socket.inet_aton(src) + socket.inet_aton(SVC) + struct.pack("!BBH", 0, 6, len(header) + len(payload))
    )
    csum = ~_ones_sum(pseudo + header + payload) & 0xFFFF
    return header[:16] + struct.pack("!H", csum) + header[18:] + payload


@dataclass
class Seen:
    ip: bytes
    l4: bytes

    @property
    def src(self) -> str:
        return socket.inet_ntoa(self.ip[12:16])


async def collect(sock: socket.socket, want: int, timeout: float) -> list[Seen]:
    """Packets (IP header, payload) from SVC arriving on a raw socket until ``want`` or ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out: list[Seen] = []
    while len(out) < want and loop.time() < deadline:
        try:
            pkt = await asyncio.wait_for(loop.sock_recv(sock, 65535), deadline - loop.time())
        except TimeoutError:
            break
        ihl = (pkt[0] & 0x0F) * 4
        seen = Seen(pkt[:ihl], pkt[ihl:])
        if seen.src == SVC:
            out.append(seen)
    return out


def raw_socket(pod: Pod, proto: int) -> socket.socket:
    sock = netns_socket(pod.netns, socket.AF_INET, socket.SOCK_RAW, proto)
    sock.setblocking(False)
    return sock


@pytest.fixture
def raw() -> Iterator[list[socket.socket]]:
    """Raw sockets a test opens, closed whatever happens."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


# --- tests -----------------------------------------------------------------------------------
class TestActionText:
    def test_ovs_prints_the_action_back_verbatim(self, rig: Rig) -> None:
        dump = rig.node.ovs.ofctl("dump-flows", "--no-stats", BR).stdout
        rendered = [line.split(" actions=", 1)[1] for line in dump.splitlines() if "tp_dst=80" in line]
        assert rendered == [REJECT_ACTION]
        assert REJECT_ACTION == "controller(userdata=6b.76.73.2d.72.65.6a.31)"
        assert USERDATA == b"kvs-rej1"
        other = [line.split(" actions=", 1)[1] for line in dump.splitlines() if "tp_dst=8" in line]
        assert sorted(other) == sorted([REJECT_ACTION, OTHER_USERDATA_ACTION, PLAIN_CONTROLLER_ACTION])
        # The reconciler's own canonical form agrees, so a desired flow never looks drifted.
        flow = Flow(table=10, priority=100, match=f"tcp,nw_dst={SVC},tp_dst=80", actions=REJECT_ACTION)
        assert Canonicalizer().canonical([flow])[(*flow.key, flow.actions)][1] == REJECT_ACTION


class TestRefusals:
    async def test_tcp_connect_is_refused_within_100ms(self, rig: Rig) -> None:
        pod = rig.pods[0]
        async with serving(rig.responder()) as r:
            results = [await tcp_connect(pod, 80) for _ in range(20)]
        outcomes = {outcome for outcome, _ in results}
        latencies = [t for _, t in results]
        print(
            f"\nSYN->RST as seen by connect(): median {statistics.median(latencies) * 1e3:.2f} ms, "
            f"max {max(latencies) * 1e3:.2f} ms over {len(latencies)}"
        )
        assert outcomes == {"refused"}
        assert max(latencies) < 0.1
        assert r.answered == 20 and r.ignored == 0 and r.limited == 0

    async def test_connected_udp_socket_gets_econnrefused(self, rig: Rig) -> None:
        pod = rig.pods[0]
        sock = netns_socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with serving(rig.responder()) as r:
                sock.connect((SVC, 53))
                sock.send(b"\x12\x34 a DNS query, more or less")
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.wait_for(loop.sock_recv(sock, 512), 1.0)
                assert r.answered == 1
        finally:
            sock.close()

    async def test_udp_without_responder_times_out(self, rig: Rig) -> None:
        """The converse: with no responder the same probe waits; the refusal above is the responder's."""
        sock = netns_socket(rig.pods[0].netns, socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect((SVC, 53))
            sock.send(b"x")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 512), 0.3)
        finally:
            sock.close()
        assert (await tcp_connect(rig.pods[0], 80, timeout=0.3))[0] == "timeout"

    async def test_sctp_init_gets_icmp_port_unreachable(self, rig: Rig, raw: list[socket.socket]) -> None:
        pod = rig.pods[0]
        assert pod.ip is not None
        icmp = raw_socket(pod, socket.IPPROTO_ICMP)
        sctp = raw_socket(pod, IPPROTO_SCTP)
        raw += [icmp, sctp]
        init = init_packet(40001, 9, 0x1234567)
        async with serving(rig.responder()) as r:
            sctp.sendto(init, (SVC, 0))
            (seen,) = await collect(icmp, 1, 1.0)
            assert r.answered == 1
        ip, body = seen.ip, seen.l4
        assert checksum_ok(ip) and checksum_ok(body)
        assert ip[8] == 64 and ip[9] == socket.IPPROTO_ICMP
        assert socket.inet_ntoa(ip[16:20]) == pod.ip
        assert (body[0], body[1]) == (3, 3)  # destination unreachable, port unreachable
        quoted_ip, quoted_l4 = body[8:28], body[28:]
        assert quoted_ip[9] == IPPROTO_SCTP
        assert socket.inet_ntoa(quoted_ip[12:16]) == pod.ip and socket.inet_ntoa(quoted_ip[16:20]) == SVC
        assert quoted_l4 == init[:8]  # RFC 792: the original IP header and the first 64 bits

    async def test_tcp_reset_numbers_follow_rfc793(self, rig: Rig, raw: list[socket.socket]) -> None:
        pod = rig.pods[0]
        assert pod.ip is not None
        sock = raw_socket(pod, socket.IPPROTO_TCP)
        raw.append(sock)
        syn_with_data = tcp_segment(pod.ip, 41001, 1000, 0, 0x02, b"hello")  # SYN + 5 bytes
        ack_with_data = tcp_segment(pod.ip, 41002, 7000, 555555, 0x18, b"abc")  # PSH|ACK
        reset = tcp_segment(pod.ip, 41003, 9000, 0, 0x04)  # RST: never answered
        async with serving(rig.responder()) as r:
            for seg in (syn_with_data, ack_with_data, reset):
                sock.sendto(seg, (SVC, 0))
            seen = await collect(sock, 3, 0.5)
            assert r.answered == 2 and r.ignored == 1
        by_port = {struct.unpack("!H", s.l4[2:4])[0]: s for s in seen}
        assert set(by_port) == {41001, 41002}
        for s in seen:
            assert checksum_ok(s.ip)
            pseudo = s.ip[12:20] + struct.pack("!BBH", 0, 6, len(s.l4))
            assert checksum_ok(pseudo + s.l4)
            assert s.ip[8] == 64 and struct.unpack("!H", s.l4[0:2])[0] == 80
        _, _, seq, ack, _, flags = struct.unpack("!HHIIBB", by_port[41001].l4[:14])
        assert (seq, ack, flags) == (0, 1000 + 1 + 5, 0x14)  # RST|ACK, ack = seq + SYN + payload
        _, _, seq, ack, _, flags = struct.unpack("!HHIIBB", by_port[41002].l4[:14])
        assert (seq, flags) == (555555, 0x04)  # RST from the segment's ack number, no ACK


class TestOnlyOurPacketIns:
    async def test_other_userdata_and_plain_controller_are_ignored(self, rig: Rig) -> None:
        pod = rig.pods[0]
        async with serving(rig.responder()) as r:
            assert (await tcp_connect(pod, 81, timeout=0.3))[0] == "timeout"
            assert (await tcp_connect(pod, 82, timeout=0.3))[0] == "timeout"
            assert r.answered == 0 and r.ignored >= 2  # the kernel may retransmit the SYN
            assert (await tcp_connect(pod, 80))[0] == "refused"
            assert r.answered == 1


class TestConnection:
    async def test_reconnects_after_vswitchd_restart(self, rig: Rig) -> None:
        pod, ovs = rig.pods[0], rig.node.ovs
        async with serving(rig.responder(backoff=(0.05, 0.5))) as r:
            assert (await tcp_connect(pod, 80))[0] == "refused"
            await asyncio.to_thread(ovs.kill_vswitchd)
            await _until(lambda: not r.connected, 2.0)
            await asyncio.to_thread(ovs.start_vswitchd)
            await _until_ofctl_answers(rig)
            await asyncio.to_thread(rig.install_flows)  # a restarted vswitchd has no flows
            await r.wait_connected(5)
            assert r.connections == 2
            assert (await tcp_connect(pod, 80))[0] == "refused"
            assert r.answered == 2

    async def test_waits_for_the_bridge_and_for_openflow15(self, bed: TestBed) -> None:
        """Started before the bridge exists, then facing a bridge that refuses OpenFlow 1.5: keeps
        retrying, and serves as soon as the bridge allows 1.5."""
        node = bed.add_node()
        responder = RejectResponder(BR, node.ovs.workdir, backoff=(0.05, 0.2))
        async with serving(responder, connect=False) as r:
            await asyncio.sleep(0.3)
            assert not r.connected
            rig = await asyncio.to_thread(_make_rig, bed, node, 1, "OpenFlow10,OpenFlow13")
            await asyncio.sleep(0.5)
            assert not r.connected and r.connections == 0
            await asyncio.to_thread(node.ovs.vsctl, "set", "bridge", BR, "protocols=OpenFlow13,OpenFlow15")
            await r.wait_connected(5)
            await asyncio.to_thread(rig.install_flows)
            assert (await tcp_connect(rig.pods[0], 80))[0] == "refused"

    async def test_idle_connection_is_probed_not_dropped(self, rig: Rig) -> None:
        """With a short probe interval our ECHO_REQUESTs keep an idle connection up: a malformed
        echo, or a reply we did not recognise, would show as a reconnect."""
        async with serving(rig.responder(probe_interval=0.1)) as r:
            await asyncio.sleep(1.0)
            assert r.connected and r.connections == 1
            assert (await tcp_connect(rig.pods[0], 80))[0] == "refused"

    async def test_cancel_closes_the_connection(self, rig: Rig) -> None:
        before = _unix_sockets()
        responder = rig.responder()
        task = asyncio.create_task(responder.run())
        await responder.wait_connected(5)
        assert _unix_sockets() == before + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert _unix_sockets() == before
        assert not responder.connected
        # And the bridge no longer has anyone answering.
        assert (await tcp_connect(rig.pods[0], 80, timeout=0.3))[0] == "timeout"


class TestFloodControl:
    async def test_per_source_limit_leaves_other_pods_served(
        self, bed: TestBed, raw: list[socket.socket]
    ) -> None:
        rig = _make_rig(bed, pods=2)
        flooder, victim = rig.pods
        assert flooder.ip is not None
        sock = raw_socket(flooder, socket.IPPROTO_TCP)
        raw.append(sock)
        async with serving(rig.responder(per_source_rate=20.0, per_source_burst=20.0)) as r:
            start = time.monotonic()
            for i in range(300):
                sock.sendto(tcp_segment(flooder.ip, 20000 + i, i, 0, 0x02), (SVC, 0))
            resets = await collect(sock, 300, 0.5)
            elapsed = time.monotonic() - start
            assert r.limited > 0
            assert len(resets) <= 20 + 20 * elapsed + 1
            # The flooder's bucket is empty; another pod is still refused at once.
            outcome, seconds = await tcp_connect(victim, 80)
            assert outcome == "refused" and seconds < 0.1

    async def test_total_limit(self, rig: Rig, raw: list[socket.socket]) -> None:
        pod = rig.pods[0]
        assert pod.ip is not None
        sock = raw_socket(pod, socket.IPPROTO_TCP)
        raw.append(sock)
        async with serving(rig.responder(rate=50.0, per_source_rate=1e6)) as r:
            start = time.monotonic()
            for i in range(400):
                sock.sendto(tcp_segment(pod.ip, 20000 + i, i, 0, 0x02), (SVC, 0))
            resets = await collect(sock, 400, 0.5)
            answered, elapsed = r.answered, time.monotonic() - start
            assert r.limited > 0
            assert 25 <= len(resets) <= answered <= 50 + 50 * elapsed + 1


class TestReplyBuilder:
    """The pure packet builder, for the cases the kernel cannot easily be made to send."""

    ETH = bytes.fromhex("02aabbccddee") + bytes.fromhex("021122334455")

    def _ip(
        self, proto: int, l4: bytes, src: str = "10.9.0.10", frag: int = 0, options: bytes = b""
    ) -> bytes:
        ihl = 5 + len(options) // 4
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 1, frag, 64, proto, 0,
            socket.inet_aton(src), socket.inet_aton(SVC),
        ) + options  # fmt: skip
        return self.ETH + b"\x08\x00" + header + l4

    def test_fin_without_ack_counts_one(self) -> None:
        seg = struct.pack("!HHIIBBHHH", 5555, 80, 0xFFFFFFFF, 0, 5 << 4, 0x01, 0, 0, 0) + b"xy"
        reply = reject_reply(self._ip(6, seg))
        assert reply is not None
        assert reply[:6] == self.ETH[6:12] and reply[6:12] == self.ETH[:6]
        _, _, seq, ack, _, flags = struct.unpack("!HHIIBB", reply[34:48])
        assert (seq, ack, flags) == (0, (0xFFFFFFFF + 2 + 1) & 0xFFFFFFFF, 0x14)  # wraps around

    def test_ip_options_are_quoted_whole(self) -> None:
        options = bytes([1, 1, 1, 0])  # NOP NOP NOP EOL
        frame = self._ip(17, struct.pack("!HHHH", 5353, 53, 12, 0) + b"abcd", options=options)
        reply = reject_reply(frame)
        assert reply is not None
        icmp = reply[34:]
        assert checksum_ok(icmp) and checksum_ok(reply[14:34])
        assert icmp[8:] == frame[14:][: 24 + 8]

    @pytest.mark.parametrize(
        "frame_args",
        [
            {"proto": 1, "l4": bytes([8, 0, 0, 0, 0, 1, 0, 1])},  # ICMP: never an error about ICMP
            {"proto": 17, "l4": b"\0" * 8, "frag": 0x0010},  # a non-first fragment
            {"proto": 17, "l4": b"\0" * 8, "src": "0.0.0.0"},
            {"proto": 17, "l4": b"\0" * 8, "src": "224.0.0.5"},
            {"proto": 6, "l4": b"\0" * 12},  # truncated TCP header
        ],
    )
    def test_never_answered(self, frame_args: dict[str, object]) -> None:
        assert reject_reply(self._ip(**frame_args)) is None  # type: ignore[arg-type]

    def test_multicast_ethernet_and_ipv6_are_not_answered(self) -> None:
        udp = self._ip(17, b"\0" * 8)
        assert reject_reply(udp) is not None
        assert reject_reply(udp[:6] + b"\x01" + udp[7:]) is None
        assert reject_reply(b"\xff" * 6 + udp[6:]) is None
        assert reject_reply(udp[:12] + b"\x86\xdd" + udp[14:]) is None


# --- helpers ---------------------------------------------------------------------------------
async def _until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def _until_ofctl_answers(rig: Rig, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(rig.node.ovs.ofctl, "dump-flows", BR)
            return
        except CommandError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _unix_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
    return count
