"""The CNI Result, parsed from any supported version and rendered in the one the caller asked for.

0.3.x/0.4.0 results carry ``ips[].version``; 1.0.0 dropped it; 1.1.0 added ``interfaces[].mtu``
(and socketPath/pciID) and route attributes. IPAM plugins answer in the same family of formats,
so the same parser reads their output.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from kvswitch.cni.spec import CniError, Code, at_least

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ROUTE_EXTRAS_1_1 = ("mtu", "advmss", "priority", "table", "scope")


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None
    socket_path: str = ""
    pci_id: str = ""


@dataclass
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    extras: dict[str, int] = field(default_factory=dict)  # 1.1.0: mtu, advmss, priority, table, scope


@dataclass
class Dns:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.nameservers or self.domain or self.search or self.options)


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: Dns = field(default_factory=Dns)

    @classmethod
    def parse(cls, data: Any, what: str = "result") -> Result:
        """Read a result of version 0.3.0 or later; CNI error 6 when it does not decode."""
        try:
            return cls._parse(data)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CniError(
                Code.DECODE_FAILURE, f"cannot decode {what}", f"{type(exc).__name__}: {exc}"
            ) from None

    @classmethod
    def _parse(cls, data: Any) -> Result:
        if not isinstance(data, dict):
            raise TypeError("a result must be a JSON object")
        if "ip4" in data or "ip6" in data:
            raise ValueError("0.1.0/0.2.0 results (ip4/ip6) are not supported")
        result = cls()
        for item in _list(data, "interfaces"):
            _require_dict(item, "interfaces[]")
            mtu = item.get("mtu")
            result.interfaces.append(
                Interface(
                    name=_str(item, "name", required=True),
                    mac=_str(item, "mac"),
                    sandbox=_str(item, "sandbox"),
                    mtu=_int(mtu, "interfaces[].mtu") if mtu is not None else None,
                    socket_path=_str(item, "socketPath"),
                    pci_id=_str(item, "pciID"),
                )
            )
        for item in _list(data, "ips"):
            _require_dict(item, "ips[]")
            gw = item.get("gateway")
            idx = item.get("interface")
            result.ips.append(
                IPConfig(
                    address=ipaddress.ip_interface(_str(item, "address", required=True)),
                    gateway=ipaddress.ip_address(_checked_str(gw, "ips[].gateway")) if gw else None,
                    interface=_int(idx, "ips[].interface") if idx is not None else None,
                )
            )
        for item in _list(data, "routes"):
            result.routes.append(parse_route(item))
        dns = data.get("dns") or {}
        _require_dict(dns, "dns")
        result.dns = Dns(
            nameservers=_str_list(dns, "nameservers"),
            domain=_str(dns, "domain"),
            search=_str_list(dns, "search"),
            options=_str_list(dns, "options"),
        )
        return result

    def render(self, version: str) -> dict[str, Any]:
        """The JSON object of this result in ``version``'s format."""
        v1 = at_least(version, "1.0.0")
        v11 = at_least(version, "1.1.0")
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = []
            for iface in self.interfaces:
                item: dict[str, Any] = {"name": iface.name}
                if iface.mac:
                    item["mac"] = iface.mac
                if v11 and iface.mtu is not None:
                    item["mtu"] = iface.mtu
                if iface.sandbox:
                    item["sandbox"] = iface.sandbox
                if v11 and iface.socket_path:
                    item["socketPath"] = iface.socket_path
                if v11 and iface.pci_id:
                    item["pciID"] = iface.pci_id
                out["interfaces"].append(item)
        if self.ips:
            out["ips"] = []
            for ip in self.ips:
                entry: dict[str, Any] = {}
                if not v1:
                    entry["version"] = str(ip.address.version)
                entry["address"] = str(ip.address)
                if ip.gateway is not None:
                    entry["gateway"] = str(ip.gateway)
                if ip.interface is not None:
                    entry["interface"] = ip.interface
                out["ips"].append(entry)
        if self.routes:
            out["routes"] = []
            for route in self.routes:
                r: dict[str, Any] = {"dst": str(route.dst)}
                if route.gw is not None:
                    r["gw"] = str(route.gw)
                if v11:
                    r.update(route.extras)
                out["routes"].append(r)
        dns: dict[str, Any] = {}
        if self.dns.nameservers:
            dns["nameservers"] = list(self.dns.nameservers)
        if self.dns.domain:
            dns["domain"] = self.dns.domain
        if self.dns.search:
            dns["search"] = list(self.dns.search)
        if self.dns.options:
            dns["options"] = list(self.dns.options)
        out["dns"] = dns
        return out


def parse_route(item: Any) -> Route:
    _require_dict(item, "routes[]")
    gw = item.get("gw")
    extras = {k: _int(item[k], f"routes[].{k}") for k in _ROUTE_EXTRAS_1_1 if item.get(k) is not None}
    return Route(
        dst=ipaddress.ip_network(_str(item, "dst", required=True), strict=False),
        gw=ipaddress.ip_address(_checked_str(gw, "routes[].gw")) if gw else None,
        extras=extras,
    )


def _require_dict(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object")


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"{key} must be a list")
    return value


def _checked_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string")
    return value


def _str(data: dict[str, Any], key: str, required: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise KeyError(key)
        return ""
    return _checked_str(value, key)


def _str_list(data: dict[str, Any], key: str) -> list[str]:
    return [_checked_str(v, f"{key}[]") for v in _list(data, key)]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer")
    return value
