"""Per-rule NetworkPolicy statistics: what the counter flows of EGRESS_METRIC / INGRESS_METRIC say.

A rule that allows a connection puts its id (:func:`kvswitch.policy.flows.rule_id`) in registers;
OUTPUT commits it into the connection's ct_label. Each rule on a node has two counter flows in its
direction's table: one matching the registers (carried only by packets a rule allowed in this
pass: a connection's first, or rarely a later one of a connection not yet allowed, such as a
Service's retransmitted SYN after a policy change; their count is the rule's sessions), one
matching ct_label (every later packet of those connections, both ways). Antrea counts the same
way (its EgressMetric/IngressMetric tables). Pure parsing here; the agent reads the flows
periodically (kvswitch.node.agent) and the CLI on demand (``kvswitchctl policy-stats``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvswitch.ovs.pipeline import EGRESS_RULE, INGRESS_RULE, PRIO_POLICY_METRIC, RuleField, Table
from kvswitch.policy.flows import rule_id, rule_name
from kvswitch.policy.model import Policy


@dataclass(frozen=True, slots=True)
class RuleCounters:
    sessions: int = 0  # connections the rule allowed (their first packets)
    packets: int = 0  # every packet of those connections, both directions
    bytes: int = 0

    def __add__(self, other: RuleCounters) -> RuleCounters:
        return RuleCounters(
            self.sessions + other.sessions, self.packets + other.packets, self.bytes + other.bytes
        )


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule by name: policy ``namespace/name``, direction, index in the policy's list."""

    policy: str
    ingress: bool
    index: int

    @property
    def namespace(self) -> str:
        return self.policy.partition("/")[0]

    @property
    def name(self) -> str:
        return self.policy.partition("/")[2]

    @property
    def direction(self) -> str:
        return "ingress" if self.ingress else "egress"

    @classmethod
    def parse(cls, rule: str) -> RuleRef:
        """From a rule's name (``ns/policy|in|0``)."""
        policy, direction, index = rule.split("|")
        return cls(policy, direction == "in", int(index))


# A counter flow: (ingress, rule id, True for the new-connection flow) → (packets, bytes).
FlowCounters = dict[tuple[bool, int, bool], tuple[int, int]]

_COUNTS = re.compile(r"n_packets=(\d+), n_bytes=(\d+)")
_TABLE = re.compile(r"\btable=(\d+)")


def _rule_regs(field: RuleField) -> re.Pattern[str]:
    return re.compile(rf"\b{field.hi.name}=(0x[0-9a-f]+|0),{field.lo.name}=(0x[0-9a-f]+|0)\b")


_REGS = {False: _rule_regs(EGRESS_RULE), True: _rule_regs(INGRESS_RULE)}
_LABEL = re.compile(r"\bct_label=(0x[0-9a-f]+)/")
_TABLES = {int(Table.EGRESS_METRIC): False, int(Table.INGRESS_METRIC): True}


def parse_counter_flows(dump: str) -> FlowCounters:
    """The rule counter flows in ``ovs-ofctl dump-flows`` output (with statistics)."""
    out: FlowCounters = {}
    for line in dump.splitlines():
        if f"priority={PRIO_POLICY_METRIC}," not in line:
            continue
        table, counts = _TABLE.search(line), _COUNTS.search(line)
        if table is None or counts is None or int(table.group(1)) not in _TABLES:
            continue
        ingress = _TABLES[int(table.group(1))]
        regs = _REGS[ingress].search(line)
        if regs is not None:
            rule, new = (int(regs.group(1), 16) << 32) | int(regs.group(2), 16), True
        elif (label := _LABEL.search(line)) is not None:
            field = INGRESS_RULE if ingress else EGRESS_RULE
            rule, new = int(label.group(1), 16) >> field.label_lo, False
        else:
            continue
        out[(ingress, rule, new)] = (int(counts.group(1)), int(counts.group(2)))
    return out


def rule_counters(flows: FlowCounters) -> dict[tuple[bool, int], RuleCounters]:
    """Per (ingress, rule id): sessions, packets and bytes."""
    out: dict[tuple[bool, int], RuleCounters] = {}
    for (ingress, rule, new), (packets, nbytes) in flows.items():
        c = RuleCounters(packets if new else 0, packets, nbytes)
        out[(ingress, rule)] = out.get((ingress, rule), RuleCounters()) + c
    return out


def rule_refs(policies: Iterable[Policy]) -> dict[int, RuleRef]:
    """Rule id → rule for every rule of ``policies`` (the CLI's names, from the API)."""
    out: dict[int, RuleRef] = {}
    for p in policies:
        for ingress, rules in ((True, p.ingress), (False, p.egress)):
            for index in range(len(rules or ())):
                out[rule_id(rule_name(p.key, ingress, index))] = RuleRef(p.key, ingress, index)
    return out


class CounterDeltas:
    """Turns the counter flows' absolute values into increments for Prometheus counters: a flow
    that went away and came back (its counters restarted) counts from zero again."""

    def __init__(self) -> None:
        self._last: FlowCounters = {}

    def update(self, flows: Mapping[tuple[bool, int, bool], tuple[int, int]]) -> FlowCounters:
        deltas: FlowCounters = {}
        for key, (packets, nbytes) in flows.items():
            before = self._last.get(key, (0, 0))
            if packets < before[0] or nbytes < before[1]:
                before = (0, 0)
            if packets != before[0] or nbytes != before[1]:
                deltas[key] = (packets - before[0], nbytes - before[1])
        self._last = dict(flows)
        return deltas
