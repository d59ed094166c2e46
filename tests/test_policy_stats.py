"""Per-rule statistics and the audit log: the parts without packets (flow dumps parsed back to
rules, counter deltas, audit userdata and packet headers decoded)."""

from __future__ import annotations

import re

from kvswitch.policy.flows import rule_id
from kvswitch.policy.stats import RuleCounters


def test_counter_flows_parse_back_to_their_rules() -> None:
    from kvswitch.policy.flows import metric_flows
    from kvswitch.policy.stats import CounterDeltas, parse_counter_flows, rule_counters

    dump = []
    for n, (key, ingress) in enumerate((("a/p|in|0|tcp:80-80", True), ("a/p|out|2", False))):
        for (table, prio, match), actions in metric_flows(key, ingress):
            dump.append(
                f" cookie=0x6000000001, duration=1.2s, table={table}, n_packets={10 + n}, n_bytes={1000 + n},"
                f" idle_age=0, priority={prio},{match} actions={actions}"
            )
    flows = parse_counter_flows("\n".join(dump))
    counters = rule_counters(flows)
    assert counters == {
        (True, rule_id("a/p|in|0")): RuleCounters(10, 20, 2000),
        (False, rule_id("a/p|out|2")): RuleCounters(11, 22, 2002),
    }
    deltas = CounterDeltas()
    assert deltas.update(flows) == flows
    assert deltas.update(flows) == {}
    restarted = {k: (1, 100) for k in flows}  # the flows were recreated: their counters restarted
    assert deltas.update(restarted) == restarted


def test_audit_userdata_and_packets_decode() -> None:
    import struct

    from kvswitch.node.audit import Decision, decode_userdata, parse_packet
    from kvswitch.ovs.pipeline import audit_action

    def userdata(action: str) -> bytes:
        return bytes(int(b, 16) for b in re.search(r"userdata=([0-9a-f.]+)", action).group(1).split("."))  # type: ignore[union-attr]

    rid = rule_id("ns/p|in|3")
    assert decode_userdata(userdata(audit_action(True, True, rid))) == Decision(True, True, rid)
    assert decode_userdata(userdata(audit_action(False, False))) == Decision(False, False, 0)
    assert decode_userdata(b"kvs-rej1") is None and decode_userdata(None) is None
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    tcp = struct.pack("!HH", 34567, 80) + bytes(16)
    eth = bytes(12) + b"\x81\x00\x00\x05" + b"\x08\x00"  # one VLAN tag
    p = parse_packet(eth + ip + tcp)
    assert p is not None and (p.protocol, p.endpoints(), p.length) == (
        "TCP",
        "10.0.0.1:34567 -> 10.0.0.2:80",
        40,
    )
    fragment = ip[:6] + b"\x00\x10" + ip[8:]  # a non-first fragment has no ports
    p = parse_packet(bytes(12) + b"\x08\x00" + fragment + tcp)
    assert p is not None and p.endpoints() == "10.0.0.1 -> 10.0.0.2"
    assert parse_packet(bytes(12) + b"\x86\xdd" + bytes(40)) is None  # IPv6 is not ours
