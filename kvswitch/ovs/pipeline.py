"""Every name of the OpenFlow pipeline, defined once: tables, registers, conntrack, cookie layout.

See docs/pipeline.md for the table-by-table description. Flow builders import names from here
and never spell a table number, register or cookie bit themselves.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import NamedTuple

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


# --- tables ----------------------------------------------------------------------------------
class Table(IntEnum):
    """Packets enter at CLASSIFIER; see docs/pipeline.md."""

    CLASSIFIER = 0  # by in_port: gateway, tunnel or a pod port; anything else is dropped
    SPOOF_GUARD = 10  # a pod may send only with its own MAC and IP, and ARP only as itself
    ARP_RESPONDER = 20  # answers every ARP request from flows; no ARP is ever flooded
    CONNTRACK = 30  # every IP packet goes through conntrack (one zone per node)
    CT_STATE = 31  # invalid dropped; new → EGRESS; established/related skip policy
    EGRESS = 40  # NetworkPolicy egress of local pods (first packet of a connection)
    L3_FORWARD = 50  # by destination IP: gateway, local pod, remote pod CIDR (tunnel), external
    INGRESS = 60  # NetworkPolicy ingress of local pods
    OUTPUT = 70  # commits new connections, sends to the port in REG_OUT_PORT
    SENTINEL = 253  # holds only the sentinel flow; nothing resubmits here (254 is OVS-internal)


# --- registers -------------------------------------------------------------------------------
REG_SOURCE = "reg0"  # where the packet entered: one of Source
REG_OUT_PORT = "reg1"  # ofport chosen by L3_FORWARD for OUTPUT


class Source(IntEnum):
    GATEWAY = 1
    TUNNEL = 2
    POD = 3


# --- fixed ports and addresses ---------------------------------------------------------------
GATEWAY_PORT = "kvs-gw0"  # internal port holding the pod CIDR's first address
TUNNEL_PORT = "kvs-tun0"  # flow-based tunnel (remote_ip=flow, key=flow)
GATEWAY_OFPORT = 65001
TUNNEL_OFPORT = 65000
GATEWAY_MAC = "02:6b:76:00:00:01"  # the virtual router MAC every pod and the host see
TUNNEL_KEY = 1  # VNI / GRE key of the pod network
CT_ZONE = 1  # conntrack zone of pod traffic

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

# --- ovsdb external_ids ----------------------------------------------------------------------
EXT_ROLE = "k-vswitch/role"  # on the gateway and tunnel ports

SENTINEL_OWNER = Owner(Category.SENTINEL, "sentinel")
NODE_OWNER = Owner(Category.NODE, "local")
POLICY_OWNER = Owner(Category.POLICY, "rules")
