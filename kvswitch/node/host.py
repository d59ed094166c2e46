"""Idempotent host networking for a node: gateway address, routes to the cluster, SNAT.

Everything runs in ``netns`` (the simulated node in tests; a name under /var/run/netns or a path)
or in the agent's own namespace (a real node, where the agent uses hostNetwork). The kernel work is
done by :mod:`kvswitch.kernel.host` over a netlink socket opened in that namespace for each call;
nftables is driven by the ``nft`` binary. Calls are blocking; the agent runs them in a thread.
"""

from __future__ import annotations

import subprocess

from kvswitch.kernel import host as kernel
from kvswitch.kernel.netns import netns_path
from kvswitch.kernel.rtnl import Rtnl, open_rtnl

NFT_TABLE = "k_vswitch"
NFT_NODEPORT_TABLE = "k_vswitch_nodeport"
NODEPORT_MASQ_MARK = 0x6B760000  # a bit pattern of ours in the packet mark


class HostNetwork:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._nodeport_script: str | None = None

    def _rtnl(self) -> Rtnl:
        return open_rtnl(netns_path(self.netns) if self.netns else None)

    def ensure_gateway(self, ifname: str, cidr: str, mac: str, mtu: int) -> bool:
        """``cidr`` (gateway IP with the pod CIDR's prefix) is the only IPv4 address of ``ifname``."""
        with self._rtnl() as rtnl:
            return kernel.ensure_gateway(rtnl, ifname, cidr, mac, mtu)

    def ensure_route(self, cidr: str, ifname: str, mtu: int) -> bool:
        """An on-link route: the ARP responder answers the host for every address in ``cidr``."""
        with self._rtnl() as rtnl:
            return kernel.ensure_route(rtnl, cidr, ifname, mtu)

    def remove_route(self, cidr: str) -> bool:
        with self._rtnl() as rtnl:
            return kernel.remove_route(rtnl, cidr)

    def routes(self) -> list[str]:
        with self._rtnl() as rtnl:
            return kernel.routes(rtnl)

    def interface_mtu_for(self, ip: str) -> int | None:
        """MTU of the interface that holds ``ip`` (the underlay), for automatic pod MTU."""
        with self._rtnl() as rtnl:
            return kernel.interface_mtu_for(rtnl, ip)

    def ensure_no_redirects(self, ifname: str) -> bool:
        return kernel.ensure_no_redirects(netns_path(self.netns) if self.netns else None, ifname)

    def ensure_forwarding(self) -> bool:
        """Forwarding is a node prerequisite: written only when off (/proc/sys may be read-only)."""
        return kernel.ensure_forwarding(netns_path(self.netns) if self.netns else None)

    def _run(self, cmd: list[str], input: str | None = None) -> str:
        full = ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd
        proc = subprocess.run(full, input=input, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def ensure_snat(self, cluster_cidr: str) -> None:
        """Masquerade pod traffic that leaves the cluster CIDR; replaces our nft table atomically."""
        ruleset = (
            f"table ip {NFT_TABLE} {{}}\n"
            f"delete table ip {NFT_TABLE}\n"
            f"table ip {NFT_TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {cluster_cidr} ip daddr != {cluster_cidr} masquerade\n"
            "  }\n"
            "}\n"
        )
        self._run(["nft", "-f", "-"], input=ruleset)

    def ensure_nodeports(self, vip: str, cluster: set[tuple[str, int]], local: set[tuple[str, int]]) -> bool:
        """Send NodePort traffic that reaches the host into OVS: DNAT to ``vip`` (routed to the
        gateway, where the proxy's flows pick the endpoint), port kept. ``cluster`` ports are also
        masqueraded (externalTrafficPolicy: Cluster, so replies return through this node); ``local``
        ports keep the client's source. Not a rule per Service: two sets of (protocol, port), as
        Antrea's proxy does with ipsets. Empty sets remove the table. True if something changed."""
        script = _nodeport_script(vip, cluster, local)
        if script == self._nodeport_script:
            return False
        self._run(["nft", "-f", "-"], input=script)
        self._nodeport_script = script
        return True

    def nodeport_rules(self) -> str:
        try:
            return self._run(["nft", "list", "table", "ip", NFT_NODEPORT_TABLE])
        except RuntimeError:
            return ""

    def snat_rules(self) -> str:
        try:
            return self._run(["nft", "list", "table", "ip", NFT_TABLE])
        except RuntimeError:
            return ""


def _nodeport_script(vip: str, cluster: set[tuple[str, int]], local: set[tuple[str, int]]) -> str:
    reset = f"table ip {NFT_NODEPORT_TABLE} {{}}\ndelete table ip {NFT_NODEPORT_TABLE}\n"
    if not cluster and not local:
        return reset

    def elements(ports: set[tuple[str, int]]) -> str:
        items = ", ".join(f"{proto.lower()} . {port}" for proto, port in sorted(ports))
        return f"    elements = {{ {items} }}\n" if items else ""

    match = "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport"
    mark = f"{NODEPORT_MASQ_MARK:#x}"
    dnat = (
        f"    {match} @cluster meta mark set meta mark | {mark} dnat ip to {vip}\n"
        f"    {match} @local dnat ip to {vip}\n"
    )
    return reset + (
        f"table ip {NFT_NODEPORT_TABLE} {{\n"
        "  set cluster {\n    type inet_proto . inet_service\n" + elements(cluster) + "  }\n"
        "  set local {\n    type inet_proto . inet_service\n" + elements(local) + "  }\n"
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        + dnat
        + "  }\n"
        "  chain output {\n    type nat hook output priority -100; policy accept;\n" + dnat + "  }\n"
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    meta mark & {mark} == {mark} masquerade\n  }}\n"
        "}\n"
    )
