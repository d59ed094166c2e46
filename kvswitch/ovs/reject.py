"""Reject answers for Services without endpoints: a TCP RST or an ICMP port unreachable, built here.

kube-proxy rejects a connection to a Service that has no usable endpoint at once: a TCP SYN gets a
TCP RST, UDP, SCTP and other IP protocols get ICMP destination unreachable / port unreachable
(type 3 code 3). OpenFlow cannot build those packets, so such a frontend's flow ends in
:data:`REJECT_ACTION`, a ``controller`` action tagged with :data:`USERDATA`, and
:class:`RejectResponder` (one per node agent) answers the packet-in with a PACKET_OUT.

Design
------

* **Channel.** The bridge's management socket ``unix:<OVS_RUNDIR>/<bridge>.mgmt`` (OVS_RUNDIR
  defaults to /var/run/openvswitch), spoken in OpenFlow 1.5 only, every message packed by hand
  with :mod:`struct` (no dependency). HELLO carries a version bitmap offering 1.5; a switch that
  does not allow 1.5 (bridge ``protocols``) fails the handshake and is retried.
* **Getting packet-ins on a service connection.** OVS (ofproto/connmgr.c, "Asynchronous Messages"
  in Documentation/topics/design.rst) never sends asynchronous messages to a service connection
  (the ``.mgmt`` socket, or any ``ovs-vsctl set-manager``-less punix listener) whose
  ``miss_send_len`` is zero, which is its default. Any ``OFPT_SET_ASYNC`` / ``NXT_SET_ASYNC_CONFIG``
  raises it to 128 as a side effect, so one OF1.4+ ``OFPT_SET_ASYNC`` both opens the gate and
  narrows delivery to what we answer: packet-ins for APPLY_ACTION, ACTION_SET and GROUP; no table
  misses, port status, flow removed, role, table status or request-forward messages.
  ``OFPT_SET_CONFIG`` is avoided on purpose: it also sets the bridge-wide IP fragment handling.
  The userdata of a ``controller(userdata=...)`` action reaches the controller only in
  ``NXT_PACKET_IN2`` (the standard PACKET_IN has no field for it), hence
  ``NXT_SET_PACKET_IN_FORMAT(NXPIF_NXT_PACKET_IN2)``. A BARRIER after the three set-up messages
  marks the connection ready (:meth:`RejectResponder.wait_connected`); an error for any of them
  drops the connection.
* **Which packet-ins.** Only those whose ``NXPINT_USERDATA`` equals :data:`USERDATA`; those whose
  userdata starts with a key of :attr:`RejectResponder.handlers` go to that handler (the
  NetworkPolicy audit log shares this connection); all others (other userdata, none,
  pauses/continuations of someone else's flows) are counted in ``ignored``.
  The action text is exactly OVS's own rendering (``ovs-ofctl -O OpenFlow15 dump-flows``), so
  the flow reconciler's string comparison holds; the tests check it against a live bridge.
* **The answer** (:func:`reject_reply`, pure). Ethernet src/dst swapped from the packet (VLAN tags
  kept), IPv4 from the original destination to the source, TTL 64, DF, ID 0 (an atomic datagram,
  RFC 6864).
  TCP: RST per RFC 793 "reset generation" (and as Linux does): if the segment carried ACK, the RST
  has seq = its ack number and no ACK; otherwise seq 0, RST|ACK, ack = seq + payload length + 1
  for SYN + 1 for FIN. A segment that itself carries RST is never answered.
  Anything else: ICMP type 3 code 3 quoting the original IP header and the first 8 bytes of its
  payload (RFC 792). RFC 1122 §3.2.2 exclusions hold: no ICMP error about an ICMP message, a
  non-first fragment, or a packet from or to a multicast/broadcast/unspecified/loopback address
  or a multicast/broadcast Ethernet address. IPv6 and non-IP packets are ignored.
  Checksums (IP, TCP with pseudo-header, ICMP) are computed here: the reply is injected after the
  pipeline, nothing downstream fills them in.
* **Sending.** PACKET_OUT with ``in_port=CONTROLLER`` and ``output:<the packet-in's in_port>``
  (``OXM_OF_IN_PORT`` from ``NXPINT_METADATA``): the reply goes straight back out of the port the
  packet came in on, bypassing the tables (and conntrack). A packet that came in on a
  flow-based tunnel port would need tunnel metadata set; Service frontends are rejected on the
  node where the client's packet enters (pod port, gateway), so that case is not handled.
* **Flood control.** A token bucket per source IPv4 address (default 100 replies/s, LRU of 4096
  sources) and one for all sources (default 1000 replies/s); a packet over either limit is dropped
  before any reply is built and counted in ``limited``. OVS itself bounds the packet-in queue of the
  connection (``controller_queue_size``, default 100), so a flood cannot grow memory here either.
* **Liveness.** ECHO_REQUESTs from OVS are answered. When nothing has arrived for
  ``probe_interval`` seconds we send one ourselves; no answer within another interval drops the
  connection. Any loss (vswitchd restart, bridge deleted, protocol error) reconnects with
  exponential backoff (``backoff`` (first, max), reset after each successful handshake).
  Cancelling :meth:`RejectResponder.run` closes the socket and returns promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

USERDATA = b"kvs-rej1"  # tags our packet-ins; the trailing digit versions the contract
# The action exactly as `ovs-ofctl -O OpenFlow15 dump-flows` prints it back:
# "controller(userdata=6b.76.73.2d.72.65.6a.31)".
REJECT_ACTION = "controller(userdata=" + ".".join(f"{b:02x}" for b in USERDATA) + ")"

DEFAULT_RUNDIR = "/var/run/openvswitch"

# --- OpenFlow 1.5 and Nicira extension constants (openflow-common.h, openflow-1.5.h, nicira-ext.h)
OFP15_VERSION = 0x06
OFPT_HELLO = 0
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
OFPT_EXPERIMENTER = 4
OFPT_PACKET_OUT = 13
OFPT_BARRIER_REQUEST = 20
OFPT_BARRIER_REPLY = 21
OFPT_SET_ASYNC = 28
OFPHET_VERSIONBITMAP = 1

NX_VENDOR_ID = 0x00002320
NXT_SET_PACKET_IN_FORMAT = 16
NXT_PACKET_IN2 = 30
NXPIF_NXT_PACKET_IN2 = 2
NXPINT_PACKET = 0
NXPINT_METADATA = 6
NXPINT_USERDATA = 7

# OFPT_SET_ASYNC properties (OF1.4+): (secondary, primary) pairs, each carrying a 32-bit mask.
OFPACPT_PACKET_IN_SECONDARY = 0
OFPACPT_PACKET_IN_PRIMARY = 1
OFPACPT_LAST = 11  # ... port status, flow removed, role status, table status, requestforward
OFPR_APPLY_ACTION = 1
OFPR_ACTION_SET = 3
OFPR_GROUP = 4
PACKET_IN_REASONS = (1 << OFPR_APPLY_ACTION) | (1 << OFPR_ACTION_SET) | (1 << OFPR_GROUP)

OFPP_MAX = 0xFFFFFF00
OFPP_LOCAL = 0xFFFFFFFE
OFPP_CONTROLLER = 0xFFFFFFFD
OFP_NO_BUFFER = 0xFFFFFFFF
OFPMT_OXM = 1
OXM_OF_IN_PORT = 0x80000004  # class OPENFLOW_BASIC, field 0, no mask, 4 bytes
OFPAT_OUTPUT = 0

_HEADER = struct.Struct("!BBHI")  # version, type, length, xid
_SETUP_XIDS = range(1, 4)  # packet-in format, async config, barrier
_BARRIER_XID = 3


class OpenFlowError(RuntimeError):
    """The switch refused the handshake or set-up, or sent something we cannot frame."""


# --- packets ---------------------------------------------------------------------------------
ETH_IPV4 = 0x0800
_VLAN_TPIDS = (0x8100, 0x88A8)
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
IP_DF = 0x4000
TTL = 64


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _no_reply_address(addr: bytes) -> bool:
    """0.0.0.0/8, loopback, multicast, class E and broadcast never get an answer (RFC 1122)."""
    return addr[0] in (0, 127) or addr[0] >= 224


@dataclass(frozen=True, slots=True)
class _Offender:
    """The parts of a rejected packet the answer is built from."""

    l2: bytes  # Ethernet header of the reply (addresses swapped, VLAN tags kept)
    ip_header: bytes  # the original IPv4 header, options included
    l4: bytes  # the original IP payload (up to what the packet-in carried)
    src: bytes
    dst: bytes
    proto: int


def _parse(frame: bytes) -> _Offender | None:
    if len(frame) < 14 or frame[0] & 1 or frame[6] & 1:  # multicast/broadcast Ethernet address
        return None
    off = 12
    (ethertype,) = struct.unpack_from("!H", frame, off)
    while ethertype in _VLAN_TPIDS and len(frame) >= off + 6:
        off += 4
        (ethertype,) = struct.unpack_from("!H", frame, off)
    if ethertype != ETH_IPV4:
        return None
    l3 = off + 2
    if len(frame) < l3 + 20 or frame[l3] >> 4 != 4:
        return None
    ihl = (frame[l3] & 0x0F) * 4
    (total_len, frag) = struct.unpack_from("!H2xH", frame, l3 + 2)
    if ihl < 20 or total_len < ihl or len(frame) < l3 + ihl or frag & 0x1FFF:
        return None
    proto = frame[l3 + 9]
    src, dst = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20]
    if proto == IPPROTO_ICMP or _no_reply_address(src) or _no_reply_address(dst):
        return None
    l4 = frame[l3 + ihl : l3 + total_len]
    if proto == IPPROTO_TCP and (len(l4) < 20 or l4[13] & TCP_RST):
        return None  # never reset a reset (RFC 793)
    l2 = frame[6:12] + frame[0:6] + frame[12:l3]
    return _Offender(l2, frame[l3 : l3 + ihl], l4, src, dst, proto)


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, tos: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 0, IP_DF, TTL, proto, 0, src, dst)
    return header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:] + payload


def _tcp_reset(p: _Offender) -> bytes:
    ihl = len(p.ip_header)
    sport, dport, seq, ack, doff, flags = struct.unpack_from("!HHIIBB", p.l4)
    (total_len,) = struct.unpack_from("!H", p.ip_header, 2)
    payload_len = max(0, total_len - ihl - (doff >> 4) * 4)
    if flags & TCP_ACK:
        rst_seq, rst_ack, rst_flags = ack, 0, TCP_RST
    else:
        length = payload_len + bool(flags & TCP_SYN) + bool(flags & TCP_FIN)
        rst_seq, rst_ack, rst_flags = 0, (seq + length) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    header = struct.pack("!HHIIBBHHH", dport, sport, rst_seq, rst_ack, 5 << 4, rst_flags, 0, 0, 0)
    pseudo = p.dst + p.src + struct.pack("!BBH", 0, IPPROTO_TCP, len(header))
    csum = inet_checksum(pseudo + header)
    tcp = header[:16] + struct.pack("!H", csum) + header[18:]
    return p.l2 + _ipv4(p.dst, p.src, IPPROTO_TCP, tcp)


def _port_unreachable(p: _Offender) -> bytes:
    quoted = p.ip_header + p.l4[:8]
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return p.l2 + _ipv4(p.dst, p.src, IPPROTO_ICMP, icmp, tos=0xC0)


def _build(p: _Offender) -> bytes:
    return _tcp_reset(p) if p.proto == IPPROTO_TCP else _port_unreachable(p)


def reject_reply(frame: bytes) -> bytes | None:
    """The Ethernet frame rejecting ``frame`` (TCP RST or ICMP port unreachable), or None when the
    packet must not be answered (see the module docstring for the rules)."""
    p = _parse(frame)
    return None if p is None else _build(p)


# --- rate limiting ---------------------------------------------------------------------------
class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rate: float, burst: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now


class RateLimiter:
    """Token buckets: one per source address (an LRU of ``max_sources``) and one for everything."""

    def __init__(
        self,
        rate: float,
        burst: float,
        per_source_rate: float,
        per_source_burst: float,
        max_sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst = rate, burst
        self.per_source_rate, self.per_source_burst = per_source_rate, per_source_burst
        self.max_sources = max_sources
        self.clock = clock
        self._total = _Bucket(burst, clock())
        self._sources: OrderedDict[bytes, _Bucket] = OrderedDict()

    def allow(self, source: bytes) -> bool:
        now = self.clock()
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = _Bucket(self.per_source_burst, now)
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
            bucket.refill(now, self.per_source_rate, self.per_source_burst)
        self._total.refill(now, self.rate, self.burst)
        if bucket.tokens < 1 or self._total.tokens < 1:
            return False
        bucket.tokens -= 1
        self._total.tokens -= 1
        return True


# --- OpenFlow messages -----------------------------------------------------------------------
def _msg(type_: int, body: bytes = b"", xid: int = 0) -> bytes:
    return _HEADER.pack(OFP15_VERSION, type_, _HEADER.size + len(body), xid) + body


def _nx(subtype: int, body: bytes, xid: int) -> bytes:
    return _msg(OFPT_EXPERIMENTER, struct.pack("!II", NX_VENDOR_ID, subtype) + body, xid)


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


HELLO = _msg(OFPT_HELLO, struct.pack("!HHI", OFPHET_VERSIONBITMAP, 8, 1 << OFP15_VERSION))


def _set_async(xid: int) -> bytes:
    props = b"".join(
        struct.pack("!HHI", t, 8, PACKET_IN_REASONS if t == OFPACPT_PACKET_IN_PRIMARY else 0)
        for t in range(OFPACPT_LAST + 1)
    )
    return _msg(OFPT_SET_ASYNC, props, xid)


def _setup() -> bytes:
    xid_format, xid_async, xid_barrier = _SETUP_XIDS
    return (
        _nx(NXT_SET_PACKET_IN_FORMAT, struct.pack("!I", NXPIF_NXT_PACKET_IN2), xid_format)
        + _set_async(xid_async)
        + _msg(OFPT_BARRIER_REQUEST, xid=xid_barrier)
    )


def packet_out(port: int, frame: bytes, xid: int = 0) -> bytes:
    """PACKET_OUT of ``frame`` from in_port CONTROLLER to ``port`` (OpenFlow 1.5)."""
    oxm = struct.pack("!II", OXM_OF_IN_PORT, OFPP_CONTROLLER)
    match = _pad8(struct.pack("!HH", OFPMT_OXM, 4 + len(oxm)) + oxm)
    action = struct.pack("!HHIH6x", OFPAT_OUTPUT, 16, port, 0)
    head = struct.pack("!IH2x", OFP_NO_BUFFER, len(action))
    return _msg(OFPT_PACKET_OUT, head + match + action + frame, xid)


def negotiate(hello: bytes) -> int:
    """The version both sides speak, from the switch's HELLO (OpenFlow 1.5 §7.5.1); ours is 1.5."""
    version = hello[0]
    off = _HEADER.size
    while off + 4 <= len(hello):
        etype, elen = struct.unpack_from("!HH", hello, off)
        if elen < 4:
            break
        if etype == OFPHET_VERSIONBITMAP and elen >= 8:
            (bitmap,) = struct.unpack_from("!I", hello, off + 4)
            if bitmap & (1 << OFP15_VERSION):
                return OFP15_VERSION
            raise OpenFlowError(f"switch does not allow OpenFlow 1.5 (version bitmap {bitmap:#x})")
        off += (elen + 7) // 8 * 8
    if version >= OFP15_VERSION:
        return OFP15_VERSION
    raise OpenFlowError(f"switch speaks at most OpenFlow version {version:#x}; OpenFlow 1.5 needed")


@dataclass(frozen=True, slots=True)
class PacketIn:
    in_port: int | None
    userdata: bytes | None
    packet: bytes


def parse_packet_in2(body: bytes) -> PacketIn:
    """The properties of an NXT_PACKET_IN2 that matter here; ``body`` follows the 16-byte NX header."""
    in_port: int | None = None
    userdata: bytes | None = None
    packet = b""
    off = 0
    while off + 4 <= len(body):
        ptype, plen = struct.unpack_from("!HH", body, off)
        if plen < 4 or off + plen > len(body):
            raise OpenFlowError(f"malformed NXT_PACKET_IN2 property {ptype} (length {plen})")
        value = body[off + 4 : off + plen]
        if ptype == NXPINT_PACKET:
            packet = value
        elif ptype == NXPINT_USERDATA:
            userdata = value
        elif ptype == NXPINT_METADATA:
            in_port = _oxm_in_port(value)
        off += (plen + 7) // 8 * 8
    return PacketIn(in_port, userdata, packet)


def _oxm_in_port(oxms: bytes) -> int | None:
    off = 0
    while off + 4 <= len(oxms):
        (header,) = struct.unpack_from("!I", oxms, off)
        length = header & 0xFF
        if header == OXM_OF_IN_PORT and off + 8 <= len(oxms):
            return int(struct.unpack_from("!I", oxms, off + 4)[0])
        off += 4 + length
    return None


def _error_text(body: bytes) -> str:
    if len(body) < 4:
        return "malformed error"
    etype, code = struct.unpack_from("!HH", body)
    return f"OpenFlow error type {etype} code {code}"


# --- the responder ---------------------------------------------------------------------------
class RejectResponder:
    """Answers :data:`REJECT_ACTION` packet-ins of one bridge; :meth:`run` until cancelled.

    ``answered``: replies sent; ``ignored``: packet-ins not ours or not answerable; ``limited``:
    dropped by the rate limits; ``connections``: successful handshakes so far.
    """

    def __init__(
        self,
        bridge: str,
        rundir: str | os.PathLike[str] | None = None,
        *,
        rate: float = 1000.0,
        burst: float | None = None,
        per_source_rate: float = 100.0,
        per_source_burst: float | None = None,
        probe_interval: float = 15.0,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        self.bridge = bridge
        self.socket_path = Path(rundir or os.environ.get("OVS_RUNDIR") or DEFAULT_RUNDIR) / f"{bridge}.mgmt"
        self.limiter = RateLimiter(
            rate, burst if burst is not None else rate, per_source_rate,
            per_source_burst if per_source_burst is not None else per_source_rate,
        )  # fmt: skip
        self.probe_interval = probe_interval
        self.backoff = backoff
        self.answered = 0
        self.ignored = 0
        self.limited = 0
        self.connections = 0
        self._ready = asyncio.Event()
        self._xid = 0x100
        self._last_warning = -1e9
        self._suppressed = 0
        # Other packet-ins of the bridge, by the first 8 bytes of their userdata (the audit log's).
        self.handlers: dict[bytes, Callable[[PacketIn], None]] = {}

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until the responder is connected and packet-in delivery is set up on the bridge."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def run(self) -> None:
        """Serve forever, reconnecting after any loss; returns only by cancellation."""
        delay = self.backoff[0]
        last_problem = ""
        while True:
            before = self.connections
            try:
                await self._session()
                problem = "connection closed"
            except (OSError, EOFError, OpenFlowError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except Exception:  # a bug here must not silently turn rejects into timeouts
                log.exception("reject responder %s failed; reconnecting", self.socket_path)
                problem = "internal error"
            if self.connections > before:
                delay = self.backoff[0]
            # A lost connection, or a new kind of failure, is worth a warning; the same failure
            # again (the bridge is still missing, still refuses OpenFlow 1.5) is not.
            level = logging.WARNING if self.connections > before or problem != last_problem else logging.DEBUG
            log.log(level, "reject responder %s: %s; retrying in %.2fs", self.socket_path, problem, delay)
            last_problem = problem
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _session(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(HELLO)
            version, type_, _, body = await asyncio.wait_for(_read(reader), self.probe_interval)
            if type_ == OFPT_ERROR:
                raise OpenFlowError(f"handshake refused: {_error_text(body)}")
            if type_ != OFPT_HELLO:
                raise OpenFlowError(f"expected HELLO, got message type {type_}")
            negotiate(_HEADER.pack(version, type_, 0, 0) + body)
            writer.write(_setup())
            await self._serve(reader, writer)
        finally:
            self._ready.clear()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        probing = False
        while True:
            try:
                header = await asyncio.wait_for(reader.readexactly(_HEADER.size), self.probe_interval)
            except TimeoutError:
                if probing:
                    raise TimeoutError("switch did not answer our echo request") from None
                writer.write(_msg(OFPT_ECHO_REQUEST, xid=self._next_xid()))
                probing = True
                continue
            probing = False
            _, type_, length, xid = _HEADER.unpack(header)
            if length < _HEADER.size:
                raise OpenFlowError(f"message length {length} < 8")
            body = await asyncio.wait_for(reader.readexactly(length - _HEADER.size), self.probe_interval)
            if type_ == OFPT_EXPERIMENTER and len(body) >= 8:
                vendor, subtype = struct.unpack_from("!II", body)
                if vendor == NX_VENDOR_ID and subtype == NXT_PACKET_IN2:
                    self._packet_in(body[8:], writer)
            elif type_ == OFPT_ECHO_REQUEST:
                writer.write(_msg(OFPT_ECHO_REPLY, body, xid))
            elif type_ == OFPT_BARRIER_REPLY and xid == _BARRIER_XID and not self._ready.is_set():
                self.connections += 1
                self._ready.set()
                log.info("reject responder connected to %s", self.socket_path)
            elif type_ == OFPT_ERROR:
                if xid in _SETUP_XIDS:
                    raise OpenFlowError(f"set-up message {xid} refused: {_error_text(body)}")
                self._warn_limited("%s (xid %#x)", _error_text(body), xid)
            await writer.drain()

    def _packet_in(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            pin = parse_packet_in2(body)
        except OpenFlowError as exc:
            self._warn_limited("%s", exc)
            self.ignored += 1
            return
        handler = self.handlers.get(pin.userdata[:8]) if pin.userdata else None
        if handler is not None:
            try:
                handler(pin)
            except Exception:  # one bad packet must not drop the connection
                log.exception("packet-in handler for %r failed", pin.userdata)
            return
        port = pin.in_port
        if pin.userdata != USERDATA or port is None or (port >= OFPP_MAX and port != OFPP_LOCAL):
            self.ignored += 1
            return
        offender = _parse(pin.packet)
        if offender is None:
            self.ignored += 1
            return
        if not self.limiter.allow(offender.src):
            self.limited += 1
            return
        writer.write(packet_out(port, _build(offender), self._next_xid()))
        self.answered += 1

    def _warn_limited(self, fmt: str, *args: object) -> None:
        """At most one warning per 5 s (a packet-out to a vanished port fails once per packet)."""
        now = time.monotonic()
        if now - self._last_warning < 5.0:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        log.warning("reject responder %s: " + fmt + suffix, self.socket_path, *args)
        self._last_warning, self._suppressed = now, 0

    def _next_xid(self) -> int:
        self._xid = self._xid + 1 if self._xid < 0xFFFFFFFF else 0x100
        return self._xid


async def _read(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    version, type_, length, xid = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length < _HEADER.size:
        raise OpenFlowError(f"message length {length} < 8")
    return version, type_, xid, await reader.readexactly(length - _HEADER.size)
