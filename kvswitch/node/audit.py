"""The NetworkPolicy audit log: allow and deny decisions of the policies annotated
``kvswitch.io/log: "true"``, one line per connection, to a rotated file on the node.

The flows of such a policy (its rules' allow flows, the isolation drops of the pods it selects)
send a copy of a new connection's first packet to the agent with
:func:`kvswitch.ovs.pipeline.audit_action`: through OVS meter ``AUDIT_METER``, so a flood loses
copies, never forwarded packets, and the agent never sees more than the meter's rate. The copies
arrive as packet-ins on the reject responder's OpenFlow connection (its ``handlers``); this module
turns each into a line and hands it to a writer thread (file I/O never runs on the event loop).
Lines (wrapped here)::

    2026-12-02T21:16:57.123456Z ALLOW ingress policy=ns/web rule=0 pod=ns/web-1
        TCP 10.0.1.5:40112 -> 10.0.2.7:80 len=60
    2026-12-02T21:16:58.020001Z DENY egress policy=ns/deny-all rule=isolation pod=ns/web-1
        UDP 10.0.2.7:5353 -> 10.0.1.9:53 len=70

``rule`` is the index of the rule in the policy's ``ingress``/``egress`` list; a deny names every
logged policy that isolates the pod in that direction (no rule allowed the connection).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import queue
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvswitch import metrics
from kvswitch.ovs.pipeline import AUDIT_USERDATA
from kvswitch.ovs.reject import PacketIn
from kvswitch.policy.stats import RuleRef

log = logging.getLogger(__name__)
_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
_ETH_IPV4, _ETH_VLAN = 0x0800, (0x8100, 0x88A8)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    ingress: bool
    rule: int  # the allowing rule's id (0 for a deny)


def decode_userdata(data: bytes | None) -> Decision | None:
    """The decision an audit copy's userdata carries (see ``audit_action``), or None."""
    if data is None or len(data) != len(AUDIT_USERDATA) + 10 or not data.startswith(AUDIT_USERDATA):
        return None
    verdict, direction = data[8:9], data[9:10]
    if verdict not in (b"A", b"D") or direction not in (b"I", b"E"):
        return None
    return Decision(verdict == b"A", direction == b"I", int.from_bytes(data[10:18], "big"))


@dataclass(frozen=True, slots=True)
class Packet:
    protocol: str
    src: str
    dst: str
    sport: int | None
    dport: int | None
    length: int  # the IP datagram's total length

    def endpoints(self) -> str:
        if self.sport is None or self.dport is None:
            return f"{self.src} -> {self.dst}"
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


def parse_packet(frame: bytes) -> Packet | None:
    """The 5-tuple of an Ethernet/IPv4 frame (VLAN tags skipped); None for anything else."""
    offset = 12
    if len(frame) < offset + 2:
        return None
    ethertype = struct.unpack_from("!H", frame, offset)[0]
    while ethertype in _ETH_VLAN and len(frame) >= offset + 6:
        offset += 4
        ethertype = struct.unpack_from("!H", frame, offset)[0]
    offset += 2
    if ethertype != _ETH_IPV4 or len(frame) < offset + 20:
        return None
    ihl = (frame[offset] & 0x0F) * 4
    total, frag, proto = (
        struct.unpack_from("!H", frame, offset + 2)[0],
        frame[offset + 6 : offset + 8],
        frame[offset + 9],
    )
    src, dst = (".".join(map(str, frame[offset + i : offset + i + 4])) for i in (12, 16))
    l4 = offset + ihl
    first_fragment = struct.unpack("!H", frag)[0] & 0x1FFF == 0
    sport = dport = None
    if proto in (6, 17, 132) and first_fragment and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
    return Packet(_PROTOCOLS.get(proto, str(proto)), src, dst, sport, dport, total)


class Describer(Protocol):
    """Names for a decision, from the agent's state."""

    def rule(self, rule: int) -> RuleRef | None: ...
    def pod(self, ip: str) -> str | None: ...
    def isolating(self, ip: str, ingress: bool) -> list[str]: ...


def format_line(decision: Decision, packet: Packet, names: Describer, now: datetime.datetime) -> str:
    pod_ip = packet.dst if decision.ingress else packet.src
    pod = names.pod(pod_ip) or "-"
    direction = "ingress" if decision.ingress else "egress"
    if decision.allowed:
        ref = names.rule(decision.rule)
        what = f"policy={ref.policy} rule={ref.index}" if ref else f"policy=- rule={decision.rule:#018x}"
        verdict = "ALLOW"
    else:
        policies = names.isolating(pod_ip, decision.ingress)
        what = f"policy={','.join(policies) or '-'} rule=isolation"
        verdict = "DENY"
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    flow = f"{packet.protocol} {packet.endpoints()} len={packet.length}"
    return f"{stamp} {verdict} {direction} {what} pod={pod} {flow}"


class _BoundedQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the event loop: when the writer falls behind, lines are dropped and counted."""

    def __init__(self, q: queue.Queue[logging.LogRecord], on_drop: Callable[[], None]) -> None:
        super().__init__(q)
        self._on_drop = on_drop

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is final text already: skip QueueHandler's formatting copy

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._on_drop()


class AuditLog:
    """Writes decisions to ``path``, rotated at ``max_bytes`` keeping ``backups`` old files.

    ``lines``: lines written (queued); ``dropped``: lines lost because the writer fell behind;
    ``ignored``: audit packet-ins that could not be decoded."""

    def __init__(self, path: str, names: Describer, max_bytes: int = 100 << 20, backups: int = 3) -> None:
        self.path = Path(path)
        self.names = names
        self.max_bytes, self.backups = max_bytes, backups
        self.lines = self.dropped = self.ignored = 0
        self._logger = logging.getLogger(f"kvswitch.audit.{id(self):x}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._listener: logging.handlers.QueueListener | None = None
        self._file: logging.Handler | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=self.max_bytes, backupCount=self.backups, encoding="utf-8"
        )
        file.setFormatter(logging.Formatter("%(message)s"))
        q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10000)
        self._logger.addHandler(_BoundedQueueHandler(q, self._count_drop))
        self._listener = logging.handlers.QueueListener(q, file)
        self._listener.start()
        self._file = file
        os.chmod(self.path, 0o640)

    def _count_drop(self) -> None:
        self.dropped += 1

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()  # writes what is queued
            self._listener = None
        for h in list(self._logger.handlers):
            self._logger.removeHandler(h)
        if self._file is not None:
            self._file.close()
            self._file = None

    def handle(self, pin: PacketIn) -> None:
        """One audit copy (a packet-in whose userdata starts with AUDIT_USERDATA)."""
        decision = decode_userdata(pin.userdata)
        packet = parse_packet(pin.packet) if decision is not None else None
        if decision is None or packet is None:
            self.ignored += 1
            return
        now = datetime.datetime.now(datetime.UTC)
        self._logger.info(format_line(decision, packet, self.names, now))
        self.lines += 1
        metrics.AUDIT_LINES.labels("allow" if decision.allowed else "deny").inc()
