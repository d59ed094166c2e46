"""Is the datapath flow cache telling the truth? And must the agent purge it after flow changes?

**Coherence check.** Every megaflow in ``ovs-appctl dpctl/dump-flows`` is a cached translation of
the OpenFlow tables. :func:`check_coherence` traces each megaflow's key through the *current*
tables with ``ofproto/trace`` and compares the datapath actions the trace computes with the ones
the datapath holds. It traces in the datapath's own key format, so nothing is lost on the way:

* the key is the one ``dpctl/dump-flows -m`` prints: the full key of the packet that created the
  megaflow (every field, masks aside), so it is a concrete packet inside every mask and the trace
  follows the very path that packet takes;
* ``in_port`` is a datapath port number; vswitchd maps it to its bridge and OpenFlow port itself
  (``dpif/show`` is read only to name ports and to keep to one bridge);
* ``recirc_id`` > 0 megaflows (everything after conntrack: the policy tables, the service proxy)
  are traced too: vswitchd resumes the frozen translation of that recirculation id with the
  megaflow's own ``ct_state``/``ct_mark``/``ct_zone``/``ct_tuple4``. When the id is gone (its
  recirc_id(0) parent flow expired) the megaflow cannot be traced; it is counted in
  ``untraceable``, never reported as incoherent;
* slow-pathed megaflows (``userspace(...,slow_path(...))``) are coherent when the trace says the
  flow is handled by the slow path for the same reasons.

A megaflow is reported only when it is incoherent in two passes with a completed revalidator round
(``revalidator/wait``) in between and still holds the same actions: flows that were merely caught
between a flow-table change and their revalidation are not reported.

**Purge rule.** OVS's userspace datapath before "dpif-netdev: Fix dpif_netdev_flow_put" (2.17.8,
3.0.5, 3.1.3, 3.2.0) modifies an overlapping megaflow found by key lookup instead of the one the
revalidator meant (by UFID); the intended one keeps its old actions for as long as packets keep it
alive. :func:`megaflow_purge_needed` decides from the running vswitchd's version and the bridge's
datapath type whether the agent must flush the megaflow cache after flow-table changes
(docs/networkpolicy.md, "Datapath cache").
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ovs.unixctl.client

DEFAULT_RUNDIR = "/var/run/openvswitch"

# --- which OVS needs the purge --------------------------------------------------------------------

# First release of each maintained branch with "dpif-netdev: Fix dpif_netdev_flow_put"
# (upstream commits a74b7dfb9, bd3a2e812, 9c600710b, 150b0fb00).
FIXED_IN: tuple[tuple[int, int, int], ...] = ((2, 17, 8), (3, 0, 5), (3, 1, 3), (3, 2, 0))
_VERSION = re.compile(r"(?:Open vSwitch\)\s*)?(\d+)\.(\d+)\.(\d+)")


def parse_ovs_version(text: str) -> tuple[int, int, int] | None:
    """``ovs-vswitchd (Open vSwitch) 3.1.0`` (or ``ovs-appctl version``) -> (3, 1, 0)."""
    m = _VERSION.search(text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def has_flow_put_fix(version: tuple[int, int, int]) -> bool:
    """True when this OVS version contains the upstream fix.

    Branch by branch: 2.17 from 2.17.8, 3.0 from 3.0.5, 3.1 from 3.1.3, and everything from 3.2.0.
    Development versions (x.y.90 and up, the branch toward the next minor) count as the next
    minor's .0 only from 3.2 on; 3.1.90 predates the fix on master."""
    if version >= FIXED_IN[-1]:
        return True
    major, minor, patch = version
    if patch >= 90:
        return False
    return any((major, minor) == fixed[:2] and patch >= fixed[2] for fixed in FIXED_IN[:-1])


def megaflow_purge_needed(version_text: str, datapath_type: str) -> bool:
    """Whether stale megaflows must be purged after flow-table changes on this switch.

    Only the userspace datapath (``netdev``) has the bug; the kernel datapath never does. An
    unparseable version is treated as affected: a purge costs a little, a stale verdict does not."""
    if datapath_type != "netdev":
        return False
    version = parse_ovs_version(version_text)
    return version is None or not has_flow_put_fix(version)


# --- dpctl/dump-flows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Megaflow:
    """One datapath flow: its key (fields with masks, as dumped) and its actions."""

    key: str
    actions: str
    ufid: str | None = None
    packets: int = 0
    used: str = ""
    thread: str = ""

    @property
    def in_port(self) -> int | None:
        m = re.search(r"(?:^|,)in_port\((\d+)\)", self.key)
        return int(m.group(1)) if m else None

    @property
    def recirc_id(self) -> int:
        m = re.search(r"(?:^|,)recirc_id\((0x[0-9a-f]+|\d+)\)", self.key)
        return int(m.group(1), 0) if m else 0

    @property
    def trace_key(self) -> str:
        """The key as one concrete packet: every ``value/mask`` becomes ``value``. The dumped value
        is the creating packet's own, so it lies inside every mask."""
        return _strip_masks(self.key)


def _split_top(text: str, sep: str = ", ") -> list[str]:
    """Split at ``sep`` outside parentheses."""
    parts: list[str] = []
    depth = start = i = 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


_MASK_IN_ATTR = re.compile(r"=([^,()=/]+)/[^,()]+")  # ipv4(src=10.0.0.1/255.0.0.0,...)
_MASK_WHOLE = re.compile(r"\(([^,()=/]+)/[^,()]+\)")  # ct_state(0x21/0x39)


def _strip_masks(key: str) -> str:
    return _MASK_WHOLE.sub(r"(\1)", _MASK_IN_ATTR.sub(r"=\1", key))


_STAT_PREFIXES = ("packets:", "bytes:", "used:", "flags:", "dp:", "offloaded:", "dp-extra-info:")


def parse_dump_flows(text: str) -> list[Megaflow]:
    """Parse ``ovs-appctl dpctl/dump-flows [-m]`` (netdev or kernel format)."""
    flows: list[Megaflow] = []
    thread = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("flow-dump from"):
            thread = line.removeprefix("flow-dump from").strip().rstrip(":")
            continue
        ufid: str | None = None
        key: str | None = None
        actions: str | None = None
        packets = 0
        used = ""
        for part in _split_top(line):
            if part.startswith("dp-extra-info:"):
                break
            if actions is not None:
                actions += ", " + part  # an action list never holds ", ", but do not lose text
            elif part.startswith("ufid:"):
                ufid = part.removeprefix("ufid:")
            elif part.startswith("actions:"):
                actions = part.removeprefix("actions:")
            elif part.startswith("packets:"):
                packets = int(part.removeprefix("packets:"))
            elif part.startswith("used:"):
                used = part.removeprefix("used:")
            elif part.startswith(_STAT_PREFIXES):
                continue
            elif key is None:
                key = part
        if key is not None and actions is not None:
            flows.append(Megaflow(key, actions.strip(), ufid, packets, used, thread))
    return flows


# --- dpif/show: datapath port -> bridge, name, OpenFlow port ---------------------------------------


@dataclass(frozen=True)
class DpPort:
    bridge: str
    name: str
    ofport: int


_DPIF_PORT = re.compile(r"^\s{4}(\S+) (\d+|LOCAL)/(\d+):")
_DPIF_BRIDGE = re.compile(r"^\s{2}(\S+):\s*$")


def parse_dpif_show(text: str) -> dict[int, DpPort]:
    ports: dict[int, DpPort] = {}
    bridge = ""
    for line in text.splitlines():
        mb = _DPIF_BRIDGE.match(line)
        if mb:
            bridge = mb.group(1)
            continue
        mp = _DPIF_PORT.match(line)
        if mp and bridge:
            ofport = 65534 if mp.group(2) == "LOCAL" else int(mp.group(2))
            ports[int(mp.group(3))] = DpPort(bridge, mp.group(1), ofport)
    return ports


# --- ofproto/trace -----------------------------------------------------------------------------

_SLOW_REASONS = {
    "Consists of CFM packets.": "cfm",
    "Consists of BFD packets.": "bfd",
    "Consists of LACP packets.": "lacp",
    "Consists of STP packets.": "stp",
    "Consists of LLDP packets.": "lldp",
    "Uses action(s) not supported by datapath.": "action",
    "Datapath can't match specifically enough.": "match",
}


@dataclass(frozen=True)
class TraceResult:
    actions: str  # the first "Datapath actions:" line: this pass, not later recirculations
    slow_path: frozenset[str] | None = None  # reasons, when the trace says "slow path"


def parse_trace(text: str) -> TraceResult | None:
    actions: str | None = None
    reasons: set[str] | None = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if actions is None and line.startswith("Datapath actions:"):
            actions = line.removeprefix("Datapath actions:").strip()
            for follow in lines[i + 1 : i + 12]:
                if follow.startswith("This flow is handled by the userspace slow path"):
                    reasons = set()
                elif reasons is not None and follow.strip().startswith("- "):
                    explanation = follow.strip()[2:].strip()
                    reasons.add(_SLOW_REASONS.get(explanation, explanation))
                elif follow.startswith(("====", "Datapath actions:")):
                    break
            break
    if actions is None:
        return None
    return TraceResult(actions, frozenset(reasons) if reasons is not None else None)


_SLOW_PATH_ACTION = re.compile(r"^userspace\(pid=\d+,slow_path\(([^)]*)\)\)$")


def actions_agree(datapath: str, trace: TraceResult) -> bool:
    if trace.slow_path is not None:
        m = _SLOW_PATH_ACTION.match(datapath)
        if not m:
            return False
        held = {r for r in m.group(1).split(",") if r}
        return not trace.slow_path or not held or held == set(trace.slow_path)
    return datapath == trace.actions


# --- talking to ovs-vswitchd -------------------------------------------------------------------


class Appctl(Protocol):
    def __call__(self, command: str, *args: str) -> str: ...


class AppctlError(RuntimeError):
    pass


def vswitchd_ctl(rundir: str | None = None) -> str:
    """The control socket of the ovs-vswitchd that uses ``rundir``: ``ovs-vswitchd.ctl`` (a private
    instance started with ``--unixctl``) or ``ovs-vswitchd.<pid>.ctl`` (the packaged daemon)."""
    d = Path(rundir or DEFAULT_RUNDIR)
    fixed = d / "ovs-vswitchd.ctl"
    if fixed.exists():
        return str(fixed)
    try:
        pid = int((d / "ovs-vswitchd.pid").read_text().strip())
    except (OSError, ValueError) as exc:
        raise AppctlError(f"no ovs-vswitchd control socket in {d}: {exc}") from None
    return str(d / f"ovs-vswitchd.{pid}.ctl")


class Unixctl:
    """One JSON-RPC connection to ovs-vswitchd's control socket: what ``ovs-appctl`` does, without a
    process per command (a trace costs ~1.5 ms this way). Blocking: use from a thread."""

    def __init__(self, path: str) -> None:
        error, client = ovs.unixctl.client.UnixctlClient.create(path)
        if error:
            raise AppctlError(f"cannot connect to {path}: error {error}")
        self._client: Any = client
        self.path = path

    def __call__(self, command: str, *args: str) -> str:
        error, failure, result = self._client.transact(command, list(args))
        if error:
            raise AppctlError(f"{command}: connection to {self.path} failed (error {error})")
        if failure is not None:
            raise AppctlError(f"{command}: {str(failure).strip()}")
        return str(result)

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def connect(rundir: str | None = None) -> Iterator[Unixctl]:
    ctl = Unixctl(vswitchd_ctl(rundir))
    try:
        yield ctl
    finally:
        ctl.close()


# --- the check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Incoherent:
    flow: Megaflow
    expected: str  # what ofproto/trace says the datapath should do
    port: str  # the in_port's name, for people

    def render(self) -> str:
        who = f"ufid:{self.flow.ufid} " if self.flow.ufid else ""
        return (
            f"{who}in_port {self.port}, {self.flow.packets} packets, used {self.flow.used}\n"
            f"  key:      {self.flow.key}\n"
            f"  datapath: {self.flow.actions}\n"
            f"  tables:   {self.expected}"
        )


@dataclass
class CoherenceReport:
    checked: int = 0  # megaflows traced (of the selected bridge)
    incoherent: list[Incoherent] = field(default_factory=list)
    untraceable: list[tuple[Megaflow, str]] = field(default_factory=list)  # (flow, why)
    other_bridges: int = 0  # megaflows whose in_port belongs to another bridge (not checked)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.incoherent

    def summary(self) -> str:
        return (
            f"{self.checked} megaflows traced, {len(self.incoherent)} incoherent, "
            f"{len(self.untraceable)} untraceable (recirculation context gone), "
            f"{self.other_bridges} on other bridges, {self.seconds:.2f} s"
        )

    def render(self) -> str:
        lines = [r.render() for r in self.incoherent]
        lines.append(self.summary())
        return "\n".join(lines)


def _one_pass(
    appctl: Appctl, bridge: str | None, ports: dict[int, DpPort]
) -> tuple[list[tuple[Megaflow, str, str]], CoherenceReport]:
    report = CoherenceReport()
    suspects: list[tuple[Megaflow, str, str]] = []
    for flow in parse_dump_flows(appctl("dpctl/dump-flows", "-m", "--no-names")):
        port = ports.get(flow.in_port) if flow.in_port is not None else None
        if bridge is not None and (port is None or port.bridge != bridge):
            report.other_bridges += 1
            continue
        try:
            trace = parse_trace(appctl("ofproto/trace", flow.trace_key))
        except AppctlError as exc:
            report.untraceable.append((flow, str(exc)))
            continue
        if trace is None:
            report.untraceable.append((flow, "no datapath actions in the trace"))
            continue
        report.checked += 1
        if not actions_agree(flow.actions, trace):
            name = port.name if port is not None else str(flow.in_port)
            suspects.append((flow, trace.actions, name))
    return suspects, report


def _identity(flow: Megaflow) -> tuple[str, str]:
    return (flow.ufid or flow.key, flow.thread)


def check_coherence(
    appctl: Appctl, bridge: str | None = "k-vswitch0", settle: bool = True
) -> CoherenceReport:
    """Trace every megaflow of ``bridge`` (all bridges: None) and report the incoherent ones.

    ``settle`` first waits for a complete revalidator round, so that flows the revalidator has
    yet to see after a flow-table change are not counted; suspects are confirmed by a second pass
    after another round. Blocking: call from a thread (:func:`check_coherence_async`)."""
    started = time.monotonic()
    if settle:
        appctl("revalidator/wait")
        appctl("revalidator/wait")  # the first may end a round that began before the change
    ports = parse_dpif_show(appctl("dpif/show"))
    suspects, report = _one_pass(appctl, bridge, ports)
    if suspects:
        appctl("revalidator/wait")
        appctl("revalidator/wait")
        again, _ = _one_pass(appctl, bridge, ports)
        still = {(_identity(f), f.actions): (f, exp, name) for f, exp, name in again}
        for flow, _, _ in suspects:
            hit = still.get((_identity(flow), flow.actions))
            if hit is not None:
                report.incoherent.append(Incoherent(hit[0], hit[1], hit[2]))
    report.seconds = time.monotonic() - started
    return report


async def check_coherence_async(
    rundir: str | None = None, bridge: str | None = "k-vswitch0", settle: bool = True
) -> CoherenceReport:
    """:func:`check_coherence` against the ovs-vswitchd of ``rundir``, in a worker thread."""

    def run() -> CoherenceReport:
        with connect(rundir) as ctl:
            return check_coherence(ctl, bridge, settle)

    return await asyncio.to_thread(run)
