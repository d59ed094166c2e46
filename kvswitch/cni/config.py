"""The call: CNI_* environment and the network configuration, validated into CNI error codes.

Validation order follows the reference Go skeleton, so runtimes see the errors they expect:
environment (4), then stdin decoding (6), then the version (1), then the configuration
(2 for fields we do not know, 7 for values that do not validate).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvswitch.cni.contract import (
    DEFAULT_BRIDGE,
    DEFAULT_OVSDB_SOCKET,
    DEFAULT_SERVER_SOCKET,
    OVERLAY_OVERHEAD,
)
from kvswitch.cni.spec import SUPPORTED_VERSIONS, CniError, Code

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
KNOWN_ARGS = frozenset(
    {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IP"}
)
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Linux interface name (the spec's rules), or None."""
    if not name:
        return "is empty"
    if len(name) > 15:
        return "is longer than 15 characters"
    if name in (".", ".."):
        return "is . or .."
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        return "contains '/', ':' or whitespace"
    return None


# --- environment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CniEnv:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


def parse_cni_args(value: str) -> dict[str, str]:
    """``K=V;K=V``; unknown keys are an error unless ``IgnoreUnknown`` is set (Go convention)."""
    args: dict[str, str] = {}
    if not value:
        return args
    for pair in value.split(";"):
        key, eq, val = pair.partition("=")
        if not eq or not key or "=" in val:
            raise CniError(Code.INVALID_ENV, "CNI_ARGS: invalid pair", f"{pair!r} is not KEY=VALUE")
        args[key] = val
    if args.get("IgnoreUnknown", "").lower() not in ("1", "true"):
        unknown = sorted(set(args) - KNOWN_ARGS)
        if unknown:
            raise CniError(
                Code.INVALID_ENV,
                "CNI_ARGS: unknown arguments",
                f"{', '.join(unknown)} (set IgnoreUnknown=1 to ignore them)",
            )
    return args


def parse_env(environ: dict[str, str]) -> CniEnv:
    """Check the CNI_* variables the command needs; CNI error 4 names the offending variable."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        what = f"unknown CNI_COMMAND {command!r}" if command else "CNI_COMMAND is not set"
        raise CniError(Code.INVALID_ENV, what, f"expected one of {', '.join(COMMANDS)}")
    attachment = command in ("ADD", "DEL", "CHECK")
    container_id = environ.get("CNI_CONTAINERID", "")
    if attachment and not _CONTAINER_ID.match(container_id):
        raise CniError(
            Code.INVALID_ENV,
            "CNI_CONTAINERID is missing or invalid" if container_id else "CNI_CONTAINERID is not set",
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )
    netns = environ.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and not netns:
        raise CniError(Code.INVALID_ENV, "CNI_NETNS is not set")
    if netns and not netns.startswith("/"):
        raise CniError(Code.INVALID_ENV, "CNI_NETNS must be an absolute path", netns)
    ifname = environ.get("CNI_IFNAME", "")
    if attachment:
        problem = ifname_problem(ifname)
        if problem:
            raise CniError(Code.INVALID_ENV, f"CNI_IFNAME {problem}", repr(ifname))
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    if command in ("ADD", "DEL", "CHECK", "GC") and not path:
        raise CniError(
            Code.INVALID_ENV, "CNI_PATH is not set", "it must list the directories holding plugins"
        )
    args = parse_cni_args(environ.get("CNI_ARGS", "")) if attachment else {}
    return CniEnv(command, container_id, netns, ifname, args, path, dict(environ))


# --- network configuration --------------------------------------------------------------------


def _ip(value: str) -> str:
    ipaddress.ip_address(value)
    return value


def _cidr(value: str) -> str:
    ipaddress.ip_network(value, strict=False)
    if "/" not in value:
        raise ValueError("expected CIDR notation a.b.c.d/len")
    return value


def _mac(value: str) -> str:
    if not _MAC.match(value):
        raise ValueError("expected a MAC address aa:bb:cc:dd:ee:ff")
    if int(value[:2], 16) & 1:
        raise ValueError("a multicast MAC cannot be an interface address")
    return value.lower()


def _ifname(value: str) -> str:
    problem = ifname_problem(value)
    if problem:
        raise ValueError(f"interface name {problem}")
    return value


def _ovsdb_remote(value: str) -> str:
    kind, sep, rest = value.partition(":")
    if not sep or kind not in ("unix", "tcp", "ssl") or not rest:
        raise ValueError("expected unix:PATH, tcp:IP:PORT or ssl:IP:PORT")
    return value


IP = Annotated[str, AfterValidator(_ip)]
CIDR = Annotated[str, AfterValidator(_cidr)]
MAC = Annotated[str, AfterValidator(_mac)]
IfName = Annotated[str, AfterValidator(_ifname)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Open(BaseModel):
    """Sections owned by someone else (the IPAM plugin, other plugins' capabilities)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class RouteConf(_Open):
    dst: CIDR
    gw: IP | None = None


class HostLocalRange(_Open):
    subnet: CIDR
    rangeStart: IP | None = None
    rangeEnd: IP | None = None
    gateway: IP | None = None


class IpamConf(_Open):
    """Passed to the IPAM plugin as is; checked here so typos fail with code 7, not deep in IPAM."""

    type: str = Field(min_length=1, pattern=r"^[^/\s]+$")
    dataDir: str | None = Field(None, min_length=1)
    routes: list[RouteConf] | None = None
    subnet: CIDR | None = None
    rangeStart: IP | None = None
    rangeEnd: IP | None = None
    gateway: IP | None = None
    ranges: list[list[HostLocalRange]] | None = None

    @model_validator(mode="after")
    def _host_local_ranges(self) -> IpamConf:
        if self.type != "host-local":
            return self
        if not self.subnet and not self.ranges:
            raise ValueError("host-local needs 'subnet' or 'ranges'")
        if self.ranges is not None and (not self.ranges or not all(self.ranges)):
            raise ValueError("'ranges' must be a non-empty list of non-empty range sets")
        flat = [(self.subnet, self.rangeStart, self.rangeEnd, self.gateway)] if self.subnet else []
        nested = [(r.subnet, r.rangeStart, r.rangeEnd, r.gateway) for rs in self.ranges or [] for r in rs]
        for subnet, *addresses in flat + nested:
            net = ipaddress.ip_network(subnet, strict=False)
            for address in addresses:
                if address is not None and ipaddress.ip_address(address) not in net:
                    raise ValueError(f"{address} is not in subnet {subnet}")
        return self


class DnsConf(_Strict):
    nameservers: list[str] = []
    domain: str = ""
    search: list[str] = []
    options: list[str] = []


class RuntimeConfig(_Open):
    mac: MAC | None = None


class Attachment(_Strict):
    containerID: str = Field(min_length=1)
    ifname: str = Field(min_length=1)


class NetConf(_Strict):
    """The plugin's network configuration (one entry of a conflist, as the runtime passes it)."""

    cniVersion: str
    name: str = Field(min_length=1, pattern=_NETWORK_NAME.pattern)
    type: str = Field(min_length=1)
    ipam: IpamConf
    bridge: IfName = DEFAULT_BRIDGE
    mtu: int | None = Field(None, ge=68, le=65535)
    underlayInterface: IfName | None = None
    encapsulation: Literal["vxlan", "geneve", "gre", "none"] = "vxlan"
    tunnelOverhead: int | None = Field(None, ge=0, le=1024)
    macMode: Literal["ip", "random"] = "ip"
    ovsdbSocket: str = Field(DEFAULT_OVSDB_SOCKET, min_length=1)
    serverSocket: str = DEFAULT_SERVER_SOCKET
    portTimeout: float = Field(5.0, gt=0, le=120)
    dns: DnsConf | None = None
    args: dict[str, Any] | None = None
    capabilities: dict[str, bool] | None = None
    runtimeConfig: RuntimeConfig | None = None
    prevResult: dict[str, Any] | None = None
    validAttachments: list[Attachment] | None = Field(None, alias="cni.dev/valid-attachments")
    # libcni also sends the spec's earlier spelling of the same list (containernetworking/cni#1101).
    attachments: list[Attachment] | None = Field(None, alias="cni.dev/attachments")

    @model_validator(mode="after")
    def _remote(self) -> NetConf:
        _ovsdb_remote(self.ovsdbSocket)
        return self

    @property
    def overhead(self) -> int:
        return (
            self.tunnelOverhead if self.tunnelOverhead is not None else OVERLAY_OVERHEAD[self.encapsulation]
        )

    @property
    def gc_attachments(self) -> list[Attachment] | None:
        return self.validAttachments if self.validAttachments is not None else self.attachments


@dataclass(frozen=True)
class Request:
    env: CniEnv
    conf: NetConf
    raw: dict[str, Any]
    stdin: bytes


def decode_stdin(stdin: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(Code.DECODE_FAILURE, "cannot decode the network configuration", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(
            Code.DECODE_FAILURE, "cannot decode the network configuration", "it must be a JSON object"
        )
    return raw


def check_version(raw: dict[str, Any]) -> str:
    version = raw.get("cniVersion")
    if version is None:
        # The reference skeleton reads a missing cniVersion as 0.1.0, which nobody supports now.
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"no cniVersion (read as 0.1.0); supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if not isinstance(version, str):
        raise CniError(Code.DECODE_FAILURE, "cannot decode cniVersion", f"{version!r} is not a string")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"{version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def parse_netconf(raw: dict[str, Any]) -> NetConf:
    try:
        return NetConf.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> CniError:
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        fields = "; ".join(f"{_loc(e['loc'])}={json.dumps(e['input'], default=str)}" for e in extra)
        return CniError(Code.UNSUPPORTED_FIELD, f"unsupported field in network configuration: {fields}")
    details = "; ".join(f"{_loc(e['loc']) or '(root)'}: {e['msg']}" for e in errors)
    return CniError(Code.INVALID_CONFIG, "invalid network configuration", details)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def parse_request(environ: dict[str, str], stdin: bytes) -> Request:
    env = parse_env(environ)
    raw = decode_stdin(stdin)
    check_version(raw)
    return Request(env, parse_netconf(raw), raw, stdin)
