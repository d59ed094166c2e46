"""Pod traffic telemetry: a VSwitchConfig's ``spec.telemetry`` as ovsdb commands on the bridge.

OVS samples in the datapath and exports by itself: sFlow (1-in-N packet headers plus interface
counters) and IPFIX (per-flow records of sampled packets), each to one collector. The commands go
into the same transaction as the node's ports, so a VSwitchConfig is applied whole or not at all;
``None`` removes what the agent set before (rows someone else made are left alone).
"""

from __future__ import annotations

from kvswitch.config import TelemetrySpec
from kvswitch.ovs.ovsdb import Command, SetIpfix, SetSflow


def telemetry_commands(bridge: str, telemetry: TelemetrySpec | None) -> list[Command]:
    sflow = telemetry.sflow if telemetry is not None else None
    ipfix = telemetry.ipfix if telemetry is not None else None
    return [
        SetSflow(bridge)
        if sflow is None
        else SetSflow(bridge, (sflow.collector,), sflow.sampling, sflow.polling, sflow.header),
        SetIpfix(bridge)
        if ipfix is None
        else SetIpfix(
            bridge,
            (ipfix.collector,),
            ipfix.sampling,
            ipfix.cache_active_timeout,
            ipfix.cache_max_flows,
            ipfix.obs_domain_id,
        ),
    ]
