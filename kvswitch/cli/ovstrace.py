"""``ovs-appctl ofproto/trace`` output, parsed: passes (one per recirculation), the flows each pass
ran through in each bridge, and where the packet went.

The text is what OVS prints (``ofproto/trace BRIDGE FLOW``)::

    Flow: tcp,in_port=2,...
    bridge("k-vswitch0")
    --------------------
     0. in_port=2, priority 200, cookie 0x10537f59c5596
        set_field:...  (its actions, one a line)
        ...
    32. ct_state=+new+trk,ip, priority 10, cookie 0x1037...
        resubmit(,33)
        33. priority 0, cookie 0x1037...      <- a resubmit's flow, indented under its caller
                drop
    Final flow: ...
    Megaflow: ...
    Datapath actions: ct(zone=1,nat),recirc(0x5)
    ====...
    recirc(0x5) - resume conntrack with default ct_state=trk|new ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvswitch.ovs.pipeline import AUDIT_USERDATA
from kvswitch.ovs.reject import USERDATA as REJECT_USERDATA

_STEP = re.compile(r"^(?P<indent>\s*)(?P<table>\d+)\. (?P<rest>.*)$")
_HEAD = re.compile(r"^(?:(?P<match>.*?), )?priority (?P<prio>\d+)(?:, cookie (?P<cookie>0x[0-9a-f]+))?$")
_BRIDGE = re.compile(r'^bridge\("(?P<name>[^"]+)"\)$')
_OUT_PORT = re.compile(r"-> output port is (\d+)")
_TUNNEL_TO = re.compile(r"-> tunneling to (\S+)")
_OUTPUT_ACTION = re.compile(r"^output:(\d+)$")
_AUDIT = "userdata=" + ".".join(f"{b:02x}" for b in AUDIT_USERDATA)  # the audit log's copies
_REJECT = "userdata=" + ".".join(f"{b:02x}" for b in REJECT_USERDATA)


@dataclass
class Step:
    """One flow the packet met (or a table it found no flow in)."""

    bridge: str
    table: int
    depth: int  # 0 for the pipeline, 1 inside a resubmit, ...
    match: str = ""
    priority: int | None = None
    cookie: int | None = None
    no_match: bool = False
    actions: list[str] = field(default_factory=list)  # as printed, with OVS's "-> ..." notes

    @property
    def drops(self) -> bool:
        """No flow, ``drop``, or nothing but a copy to the audit log (a logged isolation drop)."""
        return (
            self.no_match
            or any(a == "drop" for a in self.actions)
            or (bool(self.actions) and all(_AUDIT in a for a in self.actions))
        )

    @property
    def rejects(self) -> bool:
        """Sent to the agent's reject responder (a Service without endpoints)."""
        return any(_REJECT in a for a in self.actions)

    @property
    def output_ports(self) -> list[int]:
        ports = [int(m.group(1)) for a in self.actions if (m := _OUT_PORT.search(a))]
        ports += [int(m.group(1)) for a in self.actions if (m := _OUTPUT_ACTION.match(a))]
        return ports

    @property
    def tunnel_to(self) -> str | None:
        return next((m.group(1) for a in self.actions if (m := _TUNNEL_TO.search(a))), None)

    @property
    def in_port_reply(self) -> bool:
        return "IN_PORT" in self.actions


@dataclass
class Pass:
    """The pipeline run up to a datapath action list (one per recirculation)."""

    flow: str = ""
    steps: list[Step] = field(default_factory=list)
    final_flow: str = ""
    datapath_actions: str = ""

    def bridge_steps(self, bridge: str) -> list[Step]:
        return [s for s in self.steps if s.bridge == bridge]

    @property
    def recirculates(self) -> bool:
        return "recirc(" in self.datapath_actions

    def final_fields(self) -> dict[str, str]:
        return parse_fields(self.final_flow)


@dataclass
class OvsTrace:
    passes: list[Pass]
    raw: str

    @property
    def last(self) -> Pass:
        return self.passes[-1]


def parse_fields(text: str) -> dict[str, str]:
    """``tcp,in_port=2,nw_src=...`` → {"tcp": "", "in_port": "2", ...}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k:
            out[k.strip()] = v
    return out


def parse_trace(text: str) -> OvsTrace:
    passes: list[Pass] = []
    current: Pass | None = None
    bridge = ""
    stack: list[tuple[int, Step]] = []  # (indent of the step number, step)
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("Flow: "):
            current = Pass(flow=line[len("Flow: ") :])
            passes.append(current)
            stack = []
            continue
        if current is None or not stripped:
            continue
        if line.startswith("Final flow: "):
            current.final_flow = line[len("Final flow: ") :]
            continue
        if line.startswith("Datapath actions: "):
            current.datapath_actions = line[len("Datapath actions: ") :]
            continue
        if line.startswith("Megaflow: "):
            continue
        if set(stripped) <= {"-", "="}:  # under a bridge's name; around a recirculation's header
            stack = []
            continue
        if m := _BRIDGE.match(stripped):
            bridge = m.group("name")
            stack = []
            continue
        indent = len(line) - len(line.lstrip())
        if (m := _STEP.match(line)) and (m.group("rest") == "No match." or _HEAD.match(m.group("rest"))):
            rest = m.group("rest")
            while stack and stack[-1][0] >= indent:
                stack.pop()
            step = Step(bridge=bridge, table=int(m.group("table")), depth=len(stack))
            if rest == "No match.":
                step.no_match = True
            elif h := _HEAD.match(rest):
                step.match = h.group("match") or ""
                step.priority = int(h.group("prio"))
                step.cookie = int(h.group("cookie"), 16) if h.group("cookie") else None
            current.steps.append(step)
            stack.append((len(m.group("indent")), step))
            continue
        # an action (or a note) of the innermost step whose number sits left of it
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack:
            stack[-1][1].actions.append(stripped)
    if not passes:
        raise ValueError(f"not ofproto/trace output: {text[:200]!r}")
    return OvsTrace(passes, text)
