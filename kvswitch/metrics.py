"""Prometheus metrics of the agent (k-vswitchd) and the controller, with prometheus_client.

Each daemon serves its process's default registry on ``KVSWITCH_METRICS_PORT`` (agent 9465,
controller 9466; 0 turns it off) at ``/metrics``; the chart sets the port and the scrape annotations
or a ServiceMonitor. Names and labels are listed in docs/observability.md.

Event sites update the metrics below directly (the CNI server, the OpenFlow bundles, the reconciler,
the policy computation). Values that already live elsewhere (ovsdb reconnects, counted by the IDL
wrapper, which the CNI binary imports too and so must not import this module) are read at scrape
time by a collector.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvswitch.policy.stats import RuleRef

log = logging.getLogger(__name__)

AGENT_PORT = 9465
CONTROLLER_PORT = 9466
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)

# --- agent: CNI ------------------------------------------------------------------------------
CNI_DURATION = Histogram(
    "kvswitch_cni_request_duration_seconds",
    "CNI requests the agent's CNI server answered, by command (ADD, DEL, CHECK, ...), from the "
    "request read to the reply ready",
    ["command"],
    buckets=_LATENCY,
)
CNI_ERRORS = Counter(
    "kvswitch_cni_request_errors",
    "CNI requests answered with an error, by command and CNI error code",
    ["command", "code"],
)

# --- agent: OpenFlow ---------------------------------------------------------------------------
BUNDLE_DURATION = Histogram(
    "kvswitch_ovs_bundle_duration_seconds",
    "Atomic OpenFlow bundles sent to the bridge (ovs-ofctl --bundle), from start to OVS's answer",
    buckets=_LATENCY,
)
BUNDLE_SIZE = Histogram(
    "kvswitch_ovs_bundle_size",
    "Flow and group changes per OpenFlow bundle",
    buckets=_SIZES,
)
BUNDLE_ERRORS = Counter("kvswitch_ovs_bundle_errors", "OpenFlow bundles OVS rejected (table unchanged)")
FLOWS = Gauge(
    "kvswitch_flows",
    "Flows the agent keeps in the bridge, by table (pipeline name) and owner (category)",
    ["table", "owner"],
)
PODS = Gauge("kvswitch_pods", "Pods attached to this node's bridge, with flows")
RESYNCS = Counter(
    "kvswitch_flow_resyncs",
    "Full comparisons of the live flow table with the desired flows; result=repaired when they differed",
    ["result"],
)
REPLAYS = Counter(
    "kvswitch_flow_replays",
    "Times the bridge had lost its flows (ovs-vswitchd restarted, bridge recreated, flows deleted) "
    "and every flow was replayed",
)

# --- agent: NetworkPolicy ------------------------------------------------------------------------
POLICY_COMPUTATION = Histogram(
    "kvswitch_policy_computation_seconds",
    "NetworkPolicy recomputations of this node's policy flows (selection, clauses, flows)",
    buckets=_LATENCY,
)

_RULE_LABELS = ["namespace", "policy", "direction", "rule"]
POLICY_RULE_SESSIONS = Counter(
    "kvswitch_policy_rule_sessions",
    "Connections a NetworkPolicy rule allowed on this node (their first packets)",
    _RULE_LABELS,
)
POLICY_RULE_PACKETS = Counter(
    "kvswitch_policy_rule_packets",
    "Packets, both directions, of the connections a NetworkPolicy rule allowed on this node",
    _RULE_LABELS,
)
POLICY_RULE_BYTES = Counter(
    "kvswitch_policy_rule_bytes",
    "Bytes (Ethernet frames), both directions, of the connections a NetworkPolicy rule allowed",
    _RULE_LABELS,
)
AUDIT_LINES = Counter(
    "kvswitch_policy_audit_lines", "NetworkPolicy decisions written to the audit log", ["verdict"]
)


def record_rule_counters(
    deltas: Mapping[tuple[bool, int, bool], tuple[int, int]], names: Mapping[int, RuleRef]
) -> None:
    """Add the counter flows' increments (kvswitch.policy.stats) to the per-rule counters."""
    for (_, rule, new), (packets, nbytes) in deltas.items():
        ref = names.get(rule)
        if ref is None:
            continue  # a rule whose policy is gone: its flows go with the next update
        labels = (ref.namespace, ref.name, ref.direction, str(ref.index))
        if new:
            POLICY_RULE_SESSIONS.labels(*labels).inc(packets)
        POLICY_RULE_PACKETS.labels(*labels).inc(packets)
        POLICY_RULE_BYTES.labels(*labels).inc(nbytes)


def forget_rules(refs: Iterable[RuleRef]) -> None:
    """Rules that no longer have flows here: their series go (bounded label sets)."""
    for ref in refs:
        labels = (ref.namespace, ref.name, ref.direction, str(ref.index))
        for counter in (POLICY_RULE_SESSIONS, POLICY_RULE_PACKETS, POLICY_RULE_BYTES):
            with contextlib.suppress(KeyError):
                counter.remove(*labels)


# --- controller --------------------------------------------------------------------------------
CONTROLLER_NODES = Gauge("kvswitch_controller_nodes", "Nodes the controller sees")
CONTROLLER_CONFIGS = Gauge(
    "kvswitch_controller_vswitchconfigs",
    "VSwitchConfigs by their Ready condition (True, False, Unknown)",
    ["ready"],
)
CONTROLLER_EVENTS = Counter(
    "kvswitch_controller_events",
    "Watch events the controller handled, by kind (Node, VSwitchConfig) and type",
    ["kind", "type"],
)


CNI_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"})


def cni_command(value: str | None) -> str:
    """The command label: a CNI command, or "other" (labels never take arbitrary client input)."""
    return value if value in CNI_COMMANDS else "other"


def cni_error_code(body: bytes) -> str:
    """The ``code`` of a CNI error reply (JSON on stdout), or "unknown"."""
    try:
        data = json.loads(body)
    except ValueError:
        return "unknown"
    code = data.get("code") if isinstance(data, dict) else None
    return str(code) if code is not None else "unknown"


class _OvsdbCollector(Collector):
    """ovsdb sessions of this process that came back after being lost."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        from kvswitch.ovs.ovsdb import reconnects

        yield CounterMetricFamily(
            "kvswitch_ovsdb_reconnects",
            "Times an ovsdb connection of this process was lost and established again",
            value=reconnects(),
        )


_collector = _OvsdbCollector()
REGISTRY.register(_collector)


def serve(port: int, address: str = "") -> bool:
    """Serve /metrics on ``address:port`` in a thread; False (and an error log) when it cannot:
    metrics never stop the datapath from being served."""
    if port <= 0:
        return False
    try:
        start_http_server(port, addr=address or "0.0.0.0")
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", address or "*", port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", address or "0.0.0.0", port)
    return True
