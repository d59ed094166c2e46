"""kube-proxy for the test bed: the nftables rules kube-proxy's nftables mode writes on each node.

No kube-proxy binary can be installed here, so this renders, from the Services and EndpointSlices
in the API, the same shape of ruleset kube-proxy (``--proxy-mode=nftables``) keeps in its
``ip kube-proxy`` table: DNAT in prerouting and output through a verdict map keyed by
address . protocol . port, random choice among ready endpoints with ``numgen``, masquerade for
hairpin traffic, for traffic from outside the cluster CIDR, and for NodePorts with
``externalTrafficPolicy: Cluster``; rejects for Services without endpoints. :class:`KubeProxy`
re-renders and applies it (atomically, ``nft -f``) in every node's namespace when the API changes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvswitch_testbed.netns import run

TABLE = "kube-proxy"
MASQ_MARK = 0x4000
PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True)
class _Endpoint:
    ip: str
    port: int
    node: str | None
    ready: bool
    serving: bool
    terminating: bool


def _chain(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def _endpoints(
    slices: Iterable[dict[str, Any]], namespace: str, service: str
) -> list[tuple[str, str, _Endpoint]]:
    out = []
    for s in slices:
        meta = s.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("namespace") != namespace or labels.get("kubernetes.io/service-name") != service:
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False
            serving = cond.get("serving") if cond.get("serving") is not None else ready
            for addr in ep.get("addresses") or []:
                for p in s.get("ports") or []:
                    e = _Endpoint(
                        addr,
                        p["port"],
                        ep.get("nodeName"),
                        ready,
                        bool(serving),
                        bool(cond.get("terminating")),
                    )
                    out.append((p.get("name") or "", p.get("protocol") or "TCP", e))
    return out


def _usable(eps: list[_Endpoint], node: str, local: bool) -> list[_Endpoint]:
    if local:
        eps = [e for e in eps if e.node == node]
    ready = [e for e in eps if e.ready and not e.terminating]
    chosen = ready or [e for e in eps if e.serving and e.terminating]
    return sorted(set(chosen), key=lambda e: (ipaddress.IPv4Address(e.ip), e.port))


def render(services: list[dict[str, Any]], slices: list[dict[str, Any]], cluster_cidr: str, node: str) -> str:
    """The whole ``ip kube-proxy`` table for one node, as an ``nft -f`` script that replaces it."""
    chains: list[str] = []
    service_ips: list[str] = []
    node_ports: list[str] = []
    no_endpoints: list[str] = []
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        if spec.get("type") == "ExternalName" or spec.get("clusterIP") in (None, "", "None"):
            continue
        ns, name = meta.get("namespace", ""), meta["name"]
        eps_all = _endpoints(slices, ns, name)
        etp_local = spec.get("externalTrafficPolicy") == "Local"
        itp_local = spec.get("internalTrafficPolicy") == "Local"
        for p in spec.get("ports") or []:
            proto = PROTO[p.get("protocol") or "TCP"]
            pname = p.get("name") or ""
            candidates = [e for n, pr, e in eps_all if n == pname and PROTO[pr] == proto]
            internal = _usable(candidates, node, itp_local)
            svc_chain = _chain("service", ns, name, proto, p["port"])
            vips = [spec["clusterIP"], *(spec.get("externalIPs") or [])]
            vips += [
                i["ip"]
                for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
                if i.get("ip")
            ]
            if not internal:
                no_endpoints.extend(f"{ip} . {proto} . {p['port']}" for ip in vips)
                continue
            lines = [f"chain {svc_chain} {{"]
            # Traffic from outside the pod network is masqueraded (kube-proxy's --cluster-cidr rule).
            lines.append(
                f"  ip daddr {spec['clusterIP']} ip saddr != {cluster_cidr} jump mark-for-masquerade"
            )
            if len(internal) == 1:
                lines.append(
                    f"  goto {_chain('endpoint', ns, name, proto, internal[0].ip, internal[0].port)}"
                )
            else:
                vmap = ", ".join(
                    f"{i} : goto {_chain('endpoint', ns, name, proto, e.ip, e.port)}"
                    for i, e in enumerate(internal)
                )
                lines.append(f"  numgen random mod {len(internal)} vmap {{ {vmap} }}")
            lines.append("}")
            chains.append("\n".join(lines))
            for e in internal:
                chains.append(
                    f"chain {_chain('endpoint', ns, name, proto, e.ip, e.port)} {{\n"
                    f"  ip saddr {e.ip} jump mark-for-masquerade\n"
                    f"  meta l4proto {proto} dnat to {e.ip}:{e.port}\n}}"
                )
            service_ips.extend(f"{ip} . {proto} . {p['port']} : goto {svc_chain}" for ip in vips)
            if p.get("nodePort"):
                external = _usable(candidates, node, etp_local)
                if not external:
                    continue
                ext_chain = _chain("external", ns, name, proto, p["nodePort"])
                body = [] if etp_local else ["  jump mark-for-masquerade"]
                if etp_local:
                    vmap = ", ".join(
                        f"{i} : goto {_chain('endpoint', ns, name, proto, e.ip, e.port)}"
                        for i, e in enumerate(external)
                    )
                    for e in external:
                        if e not in internal:
                            chains.append(
                                f"chain {_chain('endpoint', ns, name, proto, e.ip, e.port)} {{\n"
                                f"  meta l4proto {proto} dnat to {e.ip}:{e.port}\n}}"
                            )
                    body.append(f"  numgen random mod {len(external)} vmap {{ {vmap} }}")
                else:
                    body.append(f"  goto {svc_chain}")
                chains.append(f"chain {ext_chain} {{\n" + "\n".join(body) + "\n}")
                node_ports.append(f"{proto} . {p['nodePort']} : goto {ext_chain}")

    def elements(items: list[str]) -> str:
        return f"    elements = {{ {', '.join(items)} }}\n" if items else ""

    return (
        f"table ip {TABLE}\n"
        f"delete table ip {TABLE}\n"
        f"table ip {TABLE} {{\n"
        "  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n"
        + elements(service_ips)
        + "  }\n"
        "  map service-nodeports {\n    type inet_proto . inet_service : verdict\n"
        + elements(node_ports)
        + "  }\n"
        "  set no-endpoint-services {\n    type ipv4_addr . inet_proto . inet_service\n"
        + elements(no_endpoints)
        + "  }\n"
        f"  chain mark-for-masquerade {{\n    meta mark set meta mark | {MASQ_MARK:#x}\n  }}\n"
        "  chain masquerading {\n"
        f"    meta mark & {MASQ_MARK:#x} == 0 return\n"
        f"    meta mark set meta mark ^ {MASQ_MARK:#x}\n"
        "    masquerade fully-random\n  }\n"
        "  chain services {\n"
        "    ip daddr . meta l4proto . th dport vmap @service-ips\n"
        # one rule: only addresses of this node answer on NodePorts
        "    fib daddr type local ip daddr != 127.0.0.0/8"
        " meta l4proto . th dport vmap @service-nodeports\n"
        "  }\n"
        "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        "    jump services\n  }\n"
        "  chain nat-output {\n    type nat hook output priority -100; policy accept;\n"
        "    jump services\n  }\n"
        "  chain nat-postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        "    jump masquerading\n  }\n"
        "  chain filter-reject {\n    type filter hook input priority -110; policy accept;\n"
        "    ip daddr . meta l4proto . th dport @no-endpoint-services reject\n  }\n"
        "  chain filter-forward-reject {\n    type filter hook forward priority -110; policy accept;\n"
        "    ip daddr . meta l4proto . th dport @no-endpoint-services reject\n  }\n"
        "  chain filter-output-reject {\n    type filter hook output priority -110; policy accept;\n"
        "    ip daddr . meta l4proto . th dport @no-endpoint-services reject\n  }\n"
        + "".join("  " + c.replace("\n", "\n  ") + "\n" for c in chains)
        + "}\n"
    )


class KubeProxy:
    """Keeps every node's ``ip kube-proxy`` table in step with the API (polls, as kube-proxy's
    periodic sync would; applies only when the rendered ruleset changed)."""

    def __init__(
        self,
        list_objects: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]],
        nodes: Callable[[], dict[str, str]],  # node name -> its network namespace
        cluster_cidr: str,
        interval: float = 0.1,
    ) -> None:
        self._list = list_objects
        self._nodes = nodes
        self.cluster_cidr = cluster_cidr
        self.interval = interval
        self._applied: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.syncs = 0
        self.error: str | None = None

    def sync(self) -> None:
        services, slices = self._list()
        for node, netns in self._nodes().items():
            script = render(services, slices, self.cluster_cidr, node)
            if self._applied.get(node) != script:
                run(["nft", "-f", "-"], netns, input=script)
                self._applied[node] = script
        self.syncs += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kube-proxy", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
                self.error = None
            except Exception as exc:  # keep syncing; tests read .error
                self.error = str(exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
