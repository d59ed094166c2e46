"""Typed configuration: the VSwitchConfig spec and the settings of the controller and the agent.

The VSwitchConfig rules mirror the CRD's OpenAPI schema (crds/kvswitch.io_vswitchconfigs.yaml), so an
object that reaches the agent without passing the API server's validation is still refused here,
reported in its status, and never applied.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvswitch.cni.contract import (
    DEFAULT_BRIDGE,
    DEFAULT_CNI_BIN_DIR,
    DEFAULT_CNI_CONF_DIR,
    DEFAULT_OVSDB_SOCKET,
    DEFAULT_SERVER_SOCKET,
    OVERLAY_OVERHEAD,
)

GROUP = "kvswitch.io"
VERSION = "v1alpha1"
PLURAL = "vswitchconfigs"
KIND = "VSwitchConfig"


def _cidr(value: str) -> str:
    net = ipaddress.ip_network(value, strict=True)  # host bits set → error, as the pattern cannot say
    if net.version != 4:
        raise ValueError("only IPv4 CIDRs are supported")
    return value


def _ipv4(value: str) -> str:
    ipaddress.IPv4Address(value)
    return value


IPv4CIDR = Annotated[str, AfterValidator(_cidr)]
IPv4Addr = Annotated[str, AfterValidator(_ipv4)]


class OverlayType(StrEnum):
    VXLAN = "vxlan"
    GRE = "gre"
    GENEVE = "geneve"


class ServiceProxy(StrEnum):
    """Who implements Services: k-vswitch in OpenFlow, or kube-proxy's NAT on the host."""

    OPENFLOW = "openflow"
    KUBE_PROXY = "kube-proxy"


# Bytes an overlay adds to every packet on the underlay (outer Ethernet excluded for MTU purposes).


def _collector(value: str) -> str:
    """``IPv4:port``, as the CRD's pattern says (and as OVS's sFlow/IPFIX ``targets`` take it)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or str(int(port)) != port or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not IPv4:port")
    _ipv4(host)
    return value


Collector = Annotated[str, AfterValidator(_collector)]


class SflowSpec(BaseModel):
    """sFlow export of the bridge's traffic (1-in-N packet samples and counter polls)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    collector: Collector
    sampling: int = Field(default=64, ge=1, le=2147483647, strict=True)  # 1 in N packets
    polling: int = Field(default=30, ge=1, le=3600, strict=True)  # counter polling, seconds
    header: int = Field(default=128, ge=64, le=256, strict=True)  # bytes of each sampled packet


class IpfixSpec(BaseModel):
    """IPFIX export of the bridge's sampled flows."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    collector: Collector
    sampling: int = Field(default=64, ge=1, le=2147483647, strict=True)  # 1 in N packets
    cache_active_timeout: int = Field(default=60, ge=0, le=4200, strict=True, alias="cacheActiveTimeout")
    cache_max_flows: int = Field(default=4096, ge=0, le=2147483647, strict=True, alias="cacheMaxFlows")
    obs_domain_id: int = Field(default=0, ge=0, le=2147483647, strict=True, alias="obsDomainID")


class TelemetrySpec(BaseModel):
    """Pod traffic telemetry of the node's bridge (the original k-vswitch's planned feature)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    sflow: SflowSpec | None = None
    ipfix: IpfixSpec | None = None


class VSwitchConfigSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    cluster_cidr: IPv4CIDR = Field(alias="clusterCIDR")
    pod_cidr: IPv4CIDR = Field(alias="podCIDR")
    service_cidr: IPv4CIDR = Field(alias="serviceCIDR")
    overlay_type: OverlayType = Field(alias="overlayType")
    overlay_ip: IPv4Addr = Field(alias="overlayIP")
    service_proxy: ServiceProxy = Field(default=ServiceProxy.OPENFLOW, alias="serviceProxy")
    mtu: int | None = Field(default=None, ge=576, le=9216, strict=True)  # "1450" is refused, as by the CRD
    telemetry: TelemetrySpec | None = None  # sFlow/IPFIX export; None: none

    @model_validator(mode="after")
    def _pod_cidr_inside_cluster(self) -> Self:
        pod = ipaddress.IPv4Network(self.pod_cidr)
        cluster = ipaddress.IPv4Network(self.cluster_cidr)
        if not pod.subnet_of(cluster):
            raise ValueError(f"podCIDR {pod} is not inside clusterCIDR {cluster}")
        if pod.num_addresses < 4:
            raise ValueError(f"podCIDR {pod} is too small for a gateway and pods")
        return self

    @property
    def pod_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pod_cidr)

    @property
    def gateway_ip(self) -> str:
        """The pod CIDR's first address: the default route of every pod on the node."""
        return str(self.pod_network.network_address + 1)

    def pod_mtu(self, underlay_mtu: int = 1500) -> int:
        return self.mtu if self.mtu is not None else underlay_mtu - OVERLAY_OVERHEAD[self.overlay_type.value]

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")

    @property
    def service_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.service_cidr)


def parse_spec(spec: Any) -> VSwitchConfigSpec:
    """Validate a VSwitchConfig spec from the API; raises :class:`InvalidConfig` with a readable reason."""
    try:
        return VSwitchConfigSpec.model_validate(spec)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidConfig(reasons) from None


class InvalidConfig(ValueError):
    """A VSwitchConfig that must not be applied."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


class ControllerSettings(BaseModel):
    """From the chart's ConfigMap, through the environment (KVSWITCH_*)."""

    model_config = ConfigDict(frozen=True)

    cluster_cidr: IPv4CIDR = "10.244.0.0/16"
    service_cidr: IPv4CIDR = "10.96.0.0/12"
    overlay_type: OverlayType = OverlayType.VXLAN
    service_proxy: ServiceProxy = ServiceProxy.OPENFLOW
    mtu: int | None = Field(default=None, ge=576, le=9216)
    metrics_port: int = Field(default=9466, ge=0, le=65535)  # Prometheus /metrics; 0 = off
    metrics_address: str = ""  # "" = every address
    # Written into every VSwitchConfig (a node's own edit of spec.telemetry wins): None, none.
    telemetry: TelemetrySpec | None = None

    @classmethod
    def from_env(cls) -> ControllerSettings:
        values: dict[str, Any] = {}
        for field, var in [
            ("cluster_cidr", "KVSWITCH_CLUSTER_CIDR"),
            ("service_cidr", "KVSWITCH_SERVICE_CIDR"),
            ("overlay_type", "KVSWITCH_OVERLAY_TYPE"),
            ("service_proxy", "KVSWITCH_SERVICE_PROXY"),
            ("mtu", "KVSWITCH_MTU"),
            ("metrics_port", "KVSWITCH_METRICS_PORT"),
            ("metrics_address", "KVSWITCH_METRICS_ADDRESS"),
        ]:
            if (v := _env(var)) is not None:
                values[field] = v
        telemetry: dict[str, dict[str, Any]] = {}
        for exporter in ("sflow", "ipfix"):
            collector = _env(f"KVSWITCH_{exporter.upper()}_COLLECTOR")
            if collector is not None:
                telemetry[exporter] = {"collector": collector}
                if (rate := _env(f"KVSWITCH_{exporter.upper()}_SAMPLING")) is not None:
                    telemetry[exporter]["sampling"] = int(rate)
        if telemetry:
            values["telemetry"] = telemetry
        return cls.model_validate(values)


class AgentSettings(BaseModel):
    """Where this node's agent finds OVS and the host, from the environment (KVSWITCH_*)."""

    model_config = ConfigDict(frozen=True)

    node_name: str = Field(min_length=1)
    ovsdb: str = DEFAULT_OVSDB_SOCKET
    ovs_rundir: str | None = None  # where <bridge>.mgmt lives; None = OVS's default
    bridge: str = DEFAULT_BRIDGE
    datapath_type: str = "system"
    host_netns: str | None = None  # None: the agent runs in the host's namespace (hostNetwork)
    underlay_mtu: int = 1500
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_socket: str = DEFAULT_SERVER_SOCKET
    ipam_data_dir: str | None = None  # host-local's dataDir; None = host-local's default
    install_cni: bool = True
    resync_interval: float = 60.0
    metrics_port: int = Field(default=9465, ge=0, le=65535)  # Prometheus /metrics; 0 = off
    metrics_address: str = ""  # "" = every address
    # Warm start: this node's policy inputs as last installed, so a restarted agent replaces the
    # previous round of flows without waiting for the cluster-wide lists; "" = off
    inputs_cache: str = "/var/run/k-vswitch/policy-inputs.cache"
    inputs_cache_spacing: float = Field(default=10.0, ge=0)  # seconds at least between two saves
    # NetworkPolicy per-rule statistics: seconds between reads of the rule counter flows; 0 = off
    policy_stats_interval: float = Field(default=5.0, ge=0)
    # NetworkPolicy audit log (policies annotated kvswitch.io/log: "true")
    audit_log: str = "/var/log/kvswitch/np.log"
    audit_log_max_bytes: int = Field(default=100 << 20, gt=0)  # rotated at this size
    audit_log_backups: int = Field(default=3, ge=0)
    audit_rate: int = Field(default=5000, gt=0)  # packets/s copied to the log per node (OVS meter)
    audit_burst: int | None = Field(default=None, gt=0)  # None = audit_rate

    @classmethod
    def from_env(cls) -> AgentSettings:
        values: dict[str, Any] = {"node_name": _env("NODE_NAME", "")}
        for field in cls.model_fields:
            if field == "node_name":
                continue
            if (v := _env("KVSWITCH_" + field.upper())) is not None:
                values[field] = v
        return cls.model_validate(values)
