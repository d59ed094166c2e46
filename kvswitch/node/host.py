"""Idempotent host networking for a node: gateway address, routes to the cluster, SNAT.

Everything runs in ``netns`` (the simulated node in tests) or in the agent's own namespace (a real
node, where the agent uses hostNetwork). Calls are blocking; the agent runs them in a thread.
"""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any

from pyroute2 import IPRoute

NFT_TABLE = "k_vswitch"


class HostNetwork:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _index(self, ipr: Any, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"interface {ifname} not found")
        return int(found[0])

    def ensure_gateway(self, ifname: str, cidr: str, mac: str, mtu: int) -> None:
        """``cidr`` (gateway IP with the pod CIDR's prefix) is the only IPv4 address of ``ifname``."""
        iface = ipaddress.IPv4Interface(cidr)
        with self._ipr() as ipr:
            idx = self._index(ipr, ifname)
            link = ipr.get_links(idx)[0]
            if link.get("IFLA_ADDRESS") != mac or link.get("IFLA_MTU") != mtu:
                ipr.link("set", index=idx, address=mac, mtu=mtu)
            for addr in ipr.get_addr(index=idx, family=2):
                have = f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"
                if have != str(iface):
                    ipr.addr("del", index=idx, address=addr.get("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            ipr.addr("replace", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=idx, state="up")

    def ensure_route(self, cidr: str, ifname: str, mtu: int) -> None:
        """An on-link route: the ARP responder answers the host for every address in ``cidr``."""
        with self._ipr() as ipr:
            idx = self._index(ipr, ifname)
            ipr.route("replace", dst=cidr, oif=idx, scope="link", metrics={"mtu": mtu})

    def remove_route(self, cidr: str) -> None:
        net = ipaddress.IPv4Network(cidr)
        with self._ipr() as ipr:
            for r in ipr.get_routes(family=2, dst=str(net.network_address), dst_len=net.prefixlen):
                if r.get("RTA_DST") == str(net.network_address) and r["dst_len"] == net.prefixlen:
                    ipr.route("del", dst=cidr)

    def routes(self) -> list[str]:
        with self._ipr() as ipr:
            return [
                f"{r.get('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=2) if r.get("RTA_DST")
            ]

    def interface_mtu_for(self, ip: str) -> int | None:
        """MTU of the interface that holds ``ip`` (the underlay), for automatic pod MTU."""
        with self._ipr() as ipr:
            for addr in ipr.get_addr(family=2):
                if addr.get("IFA_ADDRESS") == ip:
                    return int(ipr.get_links(addr["index"])[0].get("IFLA_MTU"))
        return None

    def _run(self, cmd: list[str], input: str | None = None) -> str:
        full = ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd
        proc = subprocess.run(full, input=input, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def ensure_forwarding(self) -> None:
        """Forwarding is a node prerequisite: write it only when off (/proc/sys may be read-only)."""
        if self._run(["sysctl", "-n", "net.ipv4.ip_forward"]).strip() != "1":
            self._run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])

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

    def snat_rules(self) -> str:
        try:
            return self._run(["nft", "list", "table", "ip", NFT_TABLE])
        except RuntimeError:
            return ""
