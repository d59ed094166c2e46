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
    POLICY = 6  # NetworkPolicy rules
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
    SENTINEL = 253  # holds only the sentinel flow; nothing resubmits here (254 is OVS-internal)


SENTINEL_OWNER = Owner(Category.SENTINEL, "sentinel")
