"""Every name of the OpenFlow pipeline, defined once: tables, registers, conntrack, cookie layout.

See docs/pipeline.md for the table-by-table description. Flow builders import names from here
and never spell a table number, register or cookie bit themselves (tests/test_pipeline_names.py
checks the source of every other module for register, NXM register and ``goto_table`` spellings).

One section per concern: cookies, tables, registers (fields and marks), actions (jumps and register
moves), conntrack, the ARP responder, ports and addresses, priorities. A new concern (a Service
proxy, say) adds its own tables to :class:`Table`, its own :class:`RegField`/:class:`RegMark`
values under registers, and its own section of actions. Everything renders in the text OVS prints
(``ovs-ofctl -O OpenFlow15``), so desired and live flows compare as strings.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from kvswitch.ovs.reject import REJECT_ACTION

# --- cookie layout (64 bits) -----------------------------------------------------------------
# | 63..48 round | 47..40 category | 39..0 owner hash |
# The round changes on every agent start, so the previous round's leftovers can be told apart and
# removed once the new round is complete; category and owner let one owner's flows be addressed
# with a cookie mask.
ROUND_SHIFT = 48
ROUND_BITS = 16
CATEGORY_SHIFT = 40
CATEGORY_BITS = 8
OWNER_BITS = 40
ROUND_MASK = ((1 << ROUND_BITS) - 1) << ROUND_SHIFT
CATEGORY_MASK = ((1 << CATEGORY_BITS) - 1) << CATEGORY_SHIFT
OWNER_MASK = (1 << OWNER_BITS) - 1
ROUND_EXTERNAL_ID = "k-vswitch-flow-round"


class Category(IntEnum):
    """Who a flow belongs to; one byte of the cookie."""

    SENTINEL = 1  # one flow whose absence means the bridge lost its flows
    STATIC = 2  # pipeline skeleton: table defaults, ARP for the gateway
    NODE = 3  # this node's gateway, tunnel and host routes
    REMOTE_NODE = 4  # one per remote node: its pod CIDR through the tunnel
    POD = 5  # one per local pod: forwarding, ARP, spoof guard
    POLICY = 6  # NetworkPolicy: all of this node's policy flows
    SERVICE = 7  # one per Service: frontends, endpoint DNAT (and its select groups)
    LEARNED = 8  # written by OVS itself (learn action: session affinity); resyncs leave them alone
    TEST = 255  # flows written by tests and benchmarks


class Owner(NamedTuple):
    category: Category
    name: str

    def __str__(self) -> str:
        return f"{self.category.name.lower()}/{self.name}"


def owner_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=5).digest(), "big")


def make_cookie(round_: int, owner: Owner) -> int:
    return (
        ((round_ & 0xFFFF) << ROUND_SHIFT)
        | ((int(owner.category) & 0xFF) << CATEGORY_SHIFT)
        | owner_hash(owner.name)
    )


def cookie_round(cookie: int) -> int:
    return (cookie & ROUND_MASK) >> ROUND_SHIFT


def cookie_category(cookie: int) -> int:
    return (cookie & CATEGORY_MASK) >> CATEGORY_SHIFT


def category_filter(category: Category) -> str:
    """``cookie=value/mask`` selecting every flow of ``category``, whatever its round and owner."""
    return f"cookie={int(category) << CATEGORY_SHIFT:#x}/{CATEGORY_MASK:#x}"


# --- tables ----------------------------------------------------------------------------------
class Table(IntEnum):
    """Packets enter at CLASSIFIER; see docs/pipeline.md."""

    CLASSIFIER = 0  # by in_port: gateway, tunnel or a pod port; anything else is dropped
    SPOOF_GUARD = 10  # a pod may send only with its own MAC and IP, and ARP only as itself
    ARP_RESPONDER = 20  # answers every ARP request from flows; no ARP is ever flooded
    CONNTRACK = 30  # hairpin replies lose their SNAT first (SNAT zone), then on to CT_ZONE
    CT_ZONE = 31  # every IP packet goes through conntrack with NAT (one zone per node)
    CT_STATE = 32  # invalid dropped; new → service stages; the rest → EGRESS
    SERVICE_AFFINITY = 33  # learned session-affinity entries: client → endpoint in registers
    SERVICE_LB = 34  # a new connection to a Service frontend → the Service port's select group
    ENDPOINT_DNAT = 35  # the chosen endpoint: commit with nat(dst=endpoint), on to EGRESS
    EGRESS = 40  # NetworkPolicy egress of local pods (first packet of a connection)
    L3_FORWARD = 50  # by destination IP: gateway, local pod, remote pod CIDR (tunnel), external
    INGRESS = 60  # NetworkPolicy ingress of local pods
    OUTPUT = 70  # commits new connections (policy rules into ct_label), hairpin SNAT
    EGRESS_METRIC = 71  # counts packets, bytes and sessions per egress NetworkPolicy rule
    INGRESS_METRIC = 72  # the same per ingress rule; sends to the port in REG_OUT_PORT
    SENTINEL = 253  # holds only the sentinel flow; nothing resubmits here (254 is OVS-internal)


# --- registers -------------------------------------------------------------------------------
def _hex(value: int) -> str:
    """A number as OVS prints it in matches and set_field: ``0``, else ``0x..``."""
    return f"{value:#x}" if value else "0"


@dataclass(frozen=True)
class RegField:
    """Bits ``lo..hi`` (inclusive) of register ``reg`` (OVS has reg0..reg15, 32 bits each)."""

    reg: int
    lo: int = 0
    hi: int = 31

    def __post_init__(self) -> None:
        if not (0 <= self.reg <= 15 and 0 <= self.lo <= self.hi <= 31):
            raise ValueError(f"no such register field: reg{self.reg}[{self.lo}..{self.hi}]")

    @property
    def name(self) -> str:
        """The register's match/set_field name, ``reg1``."""
        return f"reg{self.reg}"

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @property
    def full(self) -> bool:
        return self.width == 32

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lo

    @property
    def nxm(self) -> str:
        """The field as a move/output operand: ``NXM_NX_REG1[]``, ``NXM_NX_REG1[0..15]``, ``…[7]``."""
        if self.full:
            bits = ""
        elif self.width == 1:
            bits = str(self.lo)
        else:
            bits = f"{self.lo}..{self.hi}"
        return f"NXM_NX_REG{self.reg}[{bits}]"

    def _shifted(self, value: int) -> int:
        if not 0 <= value < 1 << self.width:
            raise ValueError(f"{value:#x} does not fit in {self.nxm}")
        return value << self.lo

    def match(self, value: int) -> str:
        """Match the field holding ``value``: ``reg0=0x3``, or ``reg0=0x30/0xf0`` for part of one."""
        v = _hex(self._shifted(value))
        return f"{self.name}={v}" if self.full else f"{self.name}={v}/{self.mask:#x}"

    def load(self, value: int) -> str:
        """Write ``value`` into the field: ``set_field:0x3->reg0`` / ``set_field:0x30/0xf0->reg0``
        (OpenFlow 1.5's spelling of ``load:0x3->NXM_NX_REG0[4..7]``; OVS prints set_field)."""
        v = _hex(self._shifted(value))
        return f"set_field:{v}->{self.name}" if self.full else f"set_field:{v}/{self.mask:#x}->{self.name}"

    def mark(self, value: int) -> RegMark:
        return RegMark(self, value)


@dataclass(frozen=True)
class RegMark:
    """A field with a fixed value: what one stage sets and a later stage matches."""

    field: RegField
    value: int

    def __post_init__(self) -> None:
        self.field.match(self.value)  # refuses a value that does not fit

    @property
    def match(self) -> str:
        return self.field.match(self.value)

    @property
    def load(self) -> str:
        return self.field.load(self.value)


class Source(IntEnum):
    GATEWAY = 1
    TUNNEL = 2
    POD = 3


REG_SOURCE = RegField(0)  # where the packet entered: one of Source (set by CLASSIFIER)
FROM_GATEWAY = REG_SOURCE.mark(Source.GATEWAY)
FROM_TUNNEL = REG_SOURCE.mark(Source.TUNNEL)
FROM_POD = REG_SOURCE.mark(Source.POD)
REG_OUT_PORT = RegField(1)  # ofport chosen by L3_FORWARD for OUTPUT
REG_SCRATCH = RegField(2)  # within one action list only (the ARP responder's address swap)
# Service proxy: what a select group's bucket (or a learned affinity entry) chose, for ENDPOINT_DNAT.
REG_ENDPOINT_IP = RegField(3)  # the endpoint's IPv4 address
REG_ENDPOINT_PORT = RegField(4, 0, 15)  # the endpoint's port
REG_AFFINITY = RegField(4, 16, 16)  # set by a learned affinity entry
AFFINITY_HIT = REG_AFFINITY.mark(1)  # a learned affinity entry chose the endpoint
REG_SERVICE_GROUP = RegField(5)  # the Service port's group id, so endpoint flows are per Service


@dataclass(frozen=True)
class RuleField:
    """A NetworkPolicy rule's 64-bit id (:func:`kvswitch.policy.flows.rule_id`): in two registers
    (``hi``, ``lo``) from the rule that allowed a new connection to OUTPUT, which commits it into
    64 bits of ct_label from bit ``label_lo``, so every later packet of the connection, both ways,
    is counted for the rule (EGRESS_METRIC / INGRESS_METRIC)."""

    hi: RegField
    lo: RegField
    label_lo: int

    def load(self, rule: int) -> str:
        return f"{self.hi.load(rule >> 32)},{self.lo.load(rule & 0xFFFFFFFF)}"

    def match(self, rule: int) -> str:
        """A packet whose connection a rule allowed in this pass (a new connection)."""
        return f"{self.hi.match(rule >> 32)},{self.lo.match(rule & 0xFFFFFFFF)}"

    def label_match(self, rule: int) -> str:
        """A packet of a connection committed with ``rule`` (as OVS prints it)."""
        return f"ct_label={_hex(rule << self.label_lo)}/{(0xFFFFFFFFFFFFFFFF << self.label_lo):#x}"

    @property
    def to_label(self) -> str:
        """The moves (inside a ct commit's exec) that record the rule in the connection."""
        lo, hi = self.label_lo, self.label_lo + 32
        return (
            f"move:{self.lo.nxm}->NXM_NX_CT_LABEL[{lo}..{lo + 31}],"
            f"move:{self.hi.nxm}->NXM_NX_CT_LABEL[{hi}..{hi + 31}]"
        )


EGRESS_RULE = RuleField(RegField(6), RegField(7), 0)  # ct_label[0..63]
INGRESS_RULE = RuleField(RegField(8), RegField(9), 64)  # ct_label[64..127]


# --- actions: jumps and register moves -------------------------------------------------------
def goto(table: Table) -> str:
    return f"goto_table:{int(table)}"


def move(src: RegField | str, dst: RegField | str) -> str:
    """Copy a field: a :class:`RegField` or an NXM operand such as ``NXM_OF_ARP_TPA[]``."""
    s = src.nxm if isinstance(src, RegField) else src
    d = dst.nxm if isinstance(dst, RegField) else dst
    return f"move:{s}->{d}"


def output(field: RegField) -> str:
    """Send to the port number held in ``field``."""
    return f"output:{field.nxm}"


def resubmit(table: Table) -> str:
    """Run ``table`` and come back (a select group's bucket, the affinity lookup)."""
    return f"resubmit(,{int(table)})"


# --- protocols -------------------------------------------------------------------------------
L4_PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}  # Kubernetes protocol → OVS match keyword


# --- conntrack -------------------------------------------------------------------------------
CT_ZONE = 1  # conntrack zone of pod traffic: policy state and Service DNAT
SNAT_ZONE = 2  # hairpin SNAT only: a pod reaching itself through a Service
HAIRPIN_SNAT_IP = "169.254.0.252"  # the source a pod sees on its own connections through a Service
NODEPORT_VIP = "169.254.0.253"  # the host DNATs NodePort traffic to it; routed into OVS


class CtMark(IntEnum):
    """Bits of ct_mark in CT_ZONE."""

    ALLOWED = 0x1  # passed NetworkPolicy (committed at OUTPUT); only such connections skip policy
    FROM_GATEWAY = 0x2  # entered from the gateway: replies go back through the host (its NAT)
    SERVICE = 0x4  # DNAT'd by the service proxy


def ct_mark_match(*bits: CtMark, unset: tuple[CtMark, ...] = ()) -> str:
    """``ct_mark=value/mask``: ``bits`` set and ``unset`` clear."""
    mask = sum(int(b) for b in (*bits, *unset))
    return f"ct_mark={_hex(sum(int(b) for b in bits))}/{mask:#x}"


@functools.cache
def _ct_mark_set(*bits: CtMark) -> str:
    value = sum(int(b) for b in bits)
    return f"set_field:{value:#x}/{value:#x}->ct_mark"


def ct_track(then: Table) -> str:
    """Send the packet through conntrack; it continues in ``then`` with ``ct_state`` set."""
    return f"ct(table={int(then)},zone={CT_ZONE})"


def ct_track_nat(then: Table) -> str:
    """Conntrack with NAT: an established Service connection gets its DNAT, a reply its reverse."""
    return f"ct(table={int(then)},zone={CT_ZONE},nat)"


def ct_unsnat(then: Table) -> str:
    """Reverse the hairpin SNAT of a reply (SNAT_ZONE), then continue in ``then``."""
    return f"ct(table={int(then)},zone={SNAT_ZONE},nat)"


def ct_commit(*bits: CtMark) -> str:
    """Commit in CT_ZONE, setting ``bits`` of ct_mark and recording the NetworkPolicy rules that
    allowed the connection (zero: none) in ct_label."""
    rules = f"{EGRESS_RULE.to_label},{INGRESS_RULE.to_label}"
    return f"ct(commit,zone={CT_ZONE},exec({_ct_mark_set(*bits)},{rules}))"


CT_COMMIT = f"ct(commit,zone={CT_ZONE})"
_SERVICE_MARK = _ct_mark_set(CtMark.SERVICE)


def ct_dnat_commit(ip: str, port: int, then: Table) -> str:
    """Commit a new Service connection translated to ``ip:port``; continue in ``then``."""
    return f"ct(commit,table={int(then)},zone={CT_ZONE},nat(dst={ip}:{port}),exec({_SERVICE_MARK}))"


HAIRPIN_SNAT = f"ct(commit,zone={SNAT_ZONE},nat(src={HAIRPIN_SNAT_IP}))"

# --- service proxy actions ---------------------------------------------------------------------
_L4_DST = {
    "tcp": ("6", "NXM_OF_TCP_DST[]"),
    "udp": ("17", "NXM_OF_UDP_DST[]"),
    "sctp": ("132", "OXM_OF_SCTP_DST[]"),
}


def learn_affinity(proto: str, timeout: int) -> str:
    """Remember client → endpoint for ``timeout`` seconds since the client's last new connection
    (only new connections look the entry up, so the idle timer is kube-proxy's ClientIP timeout)."""
    nw_proto, l4_dst = _L4_DST[proto]
    loads = ",".join(
        [
            f"load:{REG_ENDPOINT_IP.nxm}->{REG_ENDPOINT_IP.nxm}",
            f"load:{REG_ENDPOINT_PORT.nxm}->{REG_ENDPOINT_PORT.nxm}",
            f"load:{REG_SERVICE_GROUP.nxm}->{REG_SERVICE_GROUP.nxm}",
            f"load:0x1->{REG_AFFINITY.nxm}",
        ]
    )
    return (
        f"learn(table={int(Table.SERVICE_AFFINITY)},idle_timeout={timeout},priority={PRIO_AFFINITY_ENTRY},"
        f"cookie={LEARNED_COOKIE:#x},eth_type=0x800,nw_proto={nw_proto},"
        f"NXM_OF_IP_SRC[],NXM_OF_IP_DST[],{l4_dst},{loads})"
    )


def reject_connection() -> str:
    """A Service frontend without endpoints: the agent answers with a TCP RST or an ICMP port
    unreachable (kvswitch.ovs.reject), as kube-proxy does."""
    return REJECT_ACTION


# --- NetworkPolicy audit log -------------------------------------------------------------------
# A logged policy's rules and isolation send a copy of a connection's first packet to the agent
# (kvswitch.node.audit), through a meter: a flood loses log lines, never forwarded packets.
AUDIT_METER = 1  # OpenFlow meter id (packets/s) of those copies
AUDIT_USERDATA = b"kvs-aud1"  # tags the copies' packet-ins; the trailing digit versions the contract
AUDIT_COPY_BYTES = 128  # headers are all the log needs


def audit_action(allowed: bool, ingress: bool, rule: int = 0) -> str:
    """Copy the packet to the audit log: the verdict, direction and (allowed) the rule's id."""
    data = (
        AUDIT_USERDATA + (b"A" if allowed else b"D") + (b"I" if ingress else b"E") + rule.to_bytes(8, "big")
    )
    userdata = ".".join(f"{b:02x}" for b in data)
    return f"controller(max_len={AUDIT_COPY_BYTES},userdata={userdata},meter_id={AUDIT_METER})"


# --- ARP responder ---------------------------------------------------------------------------
# An ARP request is turned into its reply in place and sent back where it came from.
_ETH_SRC, _ETH_DST = "NXM_OF_ETH_SRC[]", "NXM_OF_ETH_DST[]"
_ARP_SHA, _ARP_THA = "NXM_NX_ARP_SHA[]", "NXM_NX_ARP_THA[]"
_ARP_SPA, _ARP_TPA = "NXM_OF_ARP_SPA[]", "NXM_OF_ARP_TPA[]"


def _arp_reply(mac: str, spa: list[str]) -> str:
    return ",".join(
        [
            move(_ETH_SRC, _ETH_DST),
            f"set_field:{mac}->eth_src",
            "set_field:2->arp_op",
            move(_ARP_SHA, _ARP_THA),
            f"set_field:{mac}->arp_sha",
            *spa,
            "IN_PORT",
        ]
    )


def arp_reply(ip: str, mac: str) -> str:
    """The reply ``ip`` is-at ``mac``."""
    return _arp_reply(mac, [move(_ARP_SPA, _ARP_TPA), f"set_field:{ip}->arp_spa"])


def arp_reply_any(mac: str) -> str:
    """The reply is-at ``mac`` for whatever address was asked: the requested tpa becomes the spa,
    swapped through :data:`REG_SCRATCH`."""
    return _arp_reply(
        mac, [move(_ARP_TPA, REG_SCRATCH), move(_ARP_SPA, _ARP_TPA), move(REG_SCRATCH, _ARP_SPA)]
    )


# --- fixed ports and addresses ---------------------------------------------------------------
GATEWAY_PORT = "kvs-gw0"  # internal port holding the pod CIDR's first address
TUNNEL_PORT = "kvs-tun0"  # flow-based tunnel (remote_ip=flow, key=flow)
GATEWAY_OFPORT = 65001
TUNNEL_OFPORT = 65000
GATEWAY_MAC = "02:6b:76:00:00:01"  # the virtual router MAC every pod and the host see
TUNNEL_KEY = 1  # VNI / GRE key of the pod network

# --- priorities ------------------------------------------------------------------------------
PRIO_DEFAULT = 0
PRIO_ANY_IP = 1  # just above the table's drop
PRIO_LOW = 10
PRIO_CLUSTER = 50
PRIO_REMOTE = 100
PRIO_NO_HAIRPIN = 150
PRIO_POD = 200
PRIO_GATEWAY = 300
PRIO_POLICY_ISOLATED = 100  # deny what no rule allows, for isolated pods
PRIO_POLICY_CONJ = 200  # conjunctive rule matches
PRIO_POLICY_ALLOW = 250  # rules without peer or port restriction
PRIO_POLICY_NODE = 300  # a pod and its own node always talk
PRIO_POLICY_ESTABLISHED = 400
PRIO_POLICY_METRIC = 110  # EGRESS_METRIC / INGRESS_METRIC: one rule's counters

PRIO_SERVICE = 200  # Service frontends and endpoint DNAT
PRIO_SERVICE_AFFINITY = 300  # a connection an affinity entry claimed
PRIO_AFFINITY_ENTRY = 200  # learned affinity entries
PRIO_HAIRPIN = 300  # OUTPUT: a pod's packet back to itself
PRIO_REPLY_TO_GATEWAY = 260  # L3_FORWARD: replies of connections the host handed in (its NAT)
PRIO_SKIP_EGRESS = 300  # EGRESS (kube-proxy mode): pod → ClusterIP is judged after the host's DNAT

# --- ovsdb external_ids ----------------------------------------------------------------------
EXT_ROLE = "k-vswitch/role"  # on the gateway and tunnel ports

SENTINEL_OWNER = Owner(Category.SENTINEL, "sentinel")
NODE_OWNER = Owner(Category.NODE, "local")
POLICY_OWNER = Owner(Category.POLICY, "rules")
LEARNED_COOKIE = make_cookie(0, Owner(Category.LEARNED, "affinity"))  # on every learned flow
