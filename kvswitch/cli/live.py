"""``kvswitchctl trace --live``: a real, tagged packet through the real datapath (like Antrea's
Traceflow), observed flow by flow.

1. The synthetic trace (``ofproto/trace``) gives, per node, the flows the packet should meet.
2. Each of those flows is copied with the tag added to its match (``ip_dscp=TAG``, a DSCP value
   no one else uses for the moment), one priority above the original, ``controller(userdata=…)``
   in front of its actions and a hard timeout, so only the tagged packet meets the copies and
   it is treated as the original would treat it. Copies are not made of conjunction matches
   (``conj_id``) or of flows met inside a resubmit; the delivering flow at the end of the path
   only reports and does not output, so the injected packet never reaches a pod or the host
   (what goes into the tunnel is forwarded, for the next node to observe).
3. A controller connection per node (``<bridge>.mgmt``, NXT_PACKET_IN2 as the agent's reject
   responder uses) collects the copies' packet-ins; the packet, built here byte by byte from the
   pod's real MAC and IP, is sent with ``ovs-ofctl packet-out in_port=<pod port> actions=table``
   (the source pod's port, as if the pod had sent it).
4. The copies are deleted by cookie (category TEST, owner ``traceflow``; the hard timeout removes
   them if kvswitchctl dies) and the datapath's megaflows purged, before and after.

The result: the flows where the real packet was seen, node by node, and where it was last seen.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvswitch.cli.context import NodeOvs
from kvswitch.cli.ovstrace import Step
from kvswitch.ovs.flows import parse_dump
from kvswitch.ovs.pipeline import CATEGORY_MASK, OWNER_MASK, Category, Owner, make_cookie
from kvswitch.ovs.reject import (
    _HEADER,
    HELLO,
    NX_VENDOR_ID,
    NXT_PACKET_IN2,
    OFPT_ECHO_REPLY,
    OFPT_ECHO_REQUEST,
    OFPT_ERROR,
    OFPT_EXPERIMENTER,
    OFPT_HELLO,
    _msg,
    _setup,
    inet_checksum,
    negotiate,
    parse_packet_in2,
)

USERDATA = b"kvs-trc1"  # + node index, step index
TRACE_OWNER = Owner(Category.TEST, "traceflow")
HARD_TIMEOUT = 30
_IPPROTO = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}


# --- the packet ------------------------------------------------------------------------------


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def build_frame(
    proto: str, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, dscp: int
) -> bytes:
    """An Ethernet frame: TCP SYN, UDP datagram, SCTP INIT or ICMP echo request, with valid
    checksums and ``dscp`` in the IP header."""
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    payload = b"kvswitchctl trace"
    if proto == "tcp":
        seq = random.getrandbits(32)
        head = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(head))
        l4 = head[:16] + struct.pack("!H", inet_checksum(pseudo + head)) + head[18:]
    elif proto == "udp":
        body = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(body))
        csum = inet_checksum(pseudo + body) or 0xFFFF
        l4 = body[:6] + struct.pack("!H", csum) + body[8:]
    elif proto == "sctp":
        # INIT chunk: type 1, flags 0, length 20, initiate tag, a_rwnd, streams out/in, initial TSN
        chunk = struct.pack("!BBHIIHHI", 1, 0, 20, random.getrandbits(31) | 1, 65535, 10, 10, 1)
        common = struct.pack("!HHII", sport, dport, 0, 0) + chunk
        l4 = common[:8] + struct.pack("<I", _crc32c(common)) + common[12:]
    else:
        body = struct.pack("!BBHHH", 8, 0, 0, os.getpid() & 0xFFFF, 1) + payload
        l4 = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        dscp << 2,
        20 + len(l4),
        random.getrandbits(16),
        0,
        64,
        _IPPROTO[proto],
        0,
        src,
        dst,
    )
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + l4


# --- the copies ------------------------------------------------------------------------------


def _userdata(node: int, step: int) -> bytes:
    return USERDATA + bytes([node, step])


def _hex_userdata(data: bytes) -> str:
    return ".".join(f"{b:02x}" for b in data)


@dataclass
class Tap:
    step: Step
    index: int  # position in the node's path


def tap_flows(
    ovs: NodeOvs, node_index: int, steps: list[Step], dscp: int, forward: bool
) -> tuple[list[str], list[Tap]]:
    """``add`` lines for the copies of ``steps`` (the node's bridge flows of a synthetic trace);
    ``forward``: whether the path's last flow (the output) keeps its actions."""
    cookie = make_cookie(0, TRACE_OWNER)
    lines: list[str] = []
    taps: list[Tap] = []
    candidates = [
        (i, s)
        for i, s in enumerate(steps)
        if s.depth == 0 and not s.no_match and s.priority is not None and "conj_id" not in s.match
    ]
    for n, (i, s) in enumerate(candidates):
        live = _live_actions(ovs, s)
        if live is None or (s.priority or 0) >= 65535:
            continue
        match = s.match
        if not any(match == k or match.startswith(k + ",") for k in ("ip", "tcp", "udp", "sctp", "icmp")):
            match = "ip" + (f",{match}" if match else "")
        match += f",ip_dscp={dscp}"
        last = n == len(candidates) - 1
        actions = f"controller(userdata={_hex_userdata(_userdata(node_index, i))})"
        if (not last or forward) and live != "drop":
            actions += f",{live}"
        lines.append(
            f"add cookie={cookie:#x},table={s.table},priority={s.priority + 1},"  # type: ignore[operator]
            f"hard_timeout={HARD_TIMEOUT},{match} actions={actions}"
        )
        taps.append(Tap(s, i))
    return lines, taps


def _live_actions(ovs: NodeOvs, step: Step) -> str | None:
    """The actions of the flow the trace met, as the bridge holds them."""
    spec = f"table={step.table}" + (f",{step.match}" if step.match else "")
    for flow in parse_dump(ovs.ofctl("dump-flows", "--no-stats", ovs.bridge, spec)):
        if flow.priority == step.priority and flow.match == step.match:
            return flow.actions
    return None


def remove_taps(ovs: NodeOvs) -> None:
    cookie = make_cookie(0, TRACE_OWNER)  # round 0: the mask leaves the round out
    ovs.ofctl("del-flows", ovs.bridge, f"cookie={cookie:#x}/{CATEGORY_MASK | OWNER_MASK:#x}")
    ovs.appctl("revalidator/purge")


# --- the controller connection -----------------------------------------------------------------


class Listener:
    """A controller connection to one bridge that collects our copies' packet-ins."""

    def __init__(self, ovs: NodeOvs, timeout: float = 5.0) -> None:
        rundir = Path(ovs.rundir or "/var/run/openvswitch")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(rundir / f"{ovs.bridge}.mgmt"))
        self.sock.sendall(HELLO)
        version, type_, _, body = self._read()
        if type_ != OFPT_HELLO:
            raise RuntimeError(f"expected HELLO from {ovs.name}, got type {type_}")
        negotiate(_HEADER.pack(version, type_, 0, 0) + body)
        self.sock.sendall(_setup())
        self.buffer = b""

    def _read(self) -> tuple[int, int, int, bytes]:
        head = self._exactly(_HEADER.size)
        version, type_, length, xid = _HEADER.unpack(head)
        return version, type_, xid, self._exactly(length - _HEADER.size)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the switch closed the connection")
            data += chunk
        return data

    def collect(self, seconds: float) -> list[bytes]:
        """Userdata of our packet-ins arriving within ``seconds``."""
        found: list[bytes] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                _, type_, xid, body = self._read()
            except TimeoutError:
                break
            if type_ == OFPT_ECHO_REQUEST:
                self.sock.sendall(_msg(OFPT_ECHO_REPLY, body, xid))
            elif type_ == OFPT_EXPERIMENTER and len(body) >= 8:
                vendor, subtype = struct.unpack_from("!II", body)
                if vendor == NX_VENDOR_ID and subtype == NXT_PACKET_IN2:
                    pin = parse_packet_in2(body[8:])
                    if pin.userdata and pin.userdata.startswith(USERDATA):
                        found.append(pin.userdata)
            elif type_ == OFPT_ERROR:
                raise RuntimeError(f"the switch refused our controller set-up (xid {xid})")
        return found

    def close(self) -> None:
        self.sock.close()


# --- the result ------------------------------------------------------------------------------


@dataclass
class LiveHop:
    node: str
    expected: list[Tap] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # step indexes, in the order they were observed

    @property
    def complete(self) -> bool:
        return bool(self.expected) and [t.index for t in self.expected] == self.seen

    def last_seen(self) -> Tap | None:
        by_index = {t.index: t for t in self.expected}
        return by_index.get(self.seen[-1]) if self.seen else None

    def to_json(self, table_name: Any) -> dict[str, Any]:
        by_index = {t.index: t for t in self.expected}
        return {
            "node": self.node,
            "observed": [
                {"table": by_index[i].step.table, "tableName": table_name(by_index[i].step.table),
                 "match": by_index[i].step.match, "priority": by_index[i].step.priority}
                for i in self.seen if i in by_index
            ],
            "expected": len(self.expected),
            "complete": self.complete,
        }  # fmt: skip


def run_live(
    nodes: list[tuple[NodeOvs, list[Step], bool]],
    in_port: int,
    frame_for: Any,
    wait: float = 1.0,
) -> list[LiveHop]:
    """``nodes``: (node, its synthetic path, whether its last flow forwards) in path order; the
    packet enters the first node on ``in_port``; ``frame_for(dscp)`` builds it."""
    dscp = random.choice([d for d in range(1, 64) if d not in (10, 18, 26, 34, 46, 48, 56)])
    hops: list[LiveHop] = []
    listeners: list[Listener] = []
    try:
        for index, (ovs, steps, forward) in enumerate(nodes):
            lines, taps = tap_flows(ovs, index, steps, dscp, forward)
            hops.append(LiveHop(ovs.name, taps))
            if lines:
                _bundle(ovs, lines)
            ovs.appctl("revalidator/purge")  # no cached megaflow may skip the copies
            listeners.append(Listener(ovs))
        for listener in listeners:
            listener.collect(0.05)  # the set-up's replies
        source = nodes[0][0]
        frame = frame_for(dscp)
        source.ofctl("packet-out", source.bridge, f"in_port={in_port} packet={frame.hex()} actions=table")
        deadline = time.monotonic() + wait
        for hop, listener in zip(hops, listeners, strict=True):
            for data in listener.collect(max(0.05, deadline - time.monotonic())):
                if len(data) == len(USERDATA) + 2 and data[len(USERDATA)] == hops.index(hop):
                    hop.seen.append(data[len(USERDATA) + 1])
    finally:
        for listener in listeners:
            listener.close()
        for ovs, _, _ in nodes:
            with contextlib.suppress(Exception):  # the hard timeout removes them anyway
                remove_taps(ovs)
    return hops


def _bundle(ovs: NodeOvs, lines: list[str]) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".flows") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        ovs.ofctl("--bundle", "add-flows", ovs.bridge, f.name)
