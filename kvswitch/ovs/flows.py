"""The flow model: immutable pydantic flows, their ovs-ofctl text, and parsing of dump-flows.

Desired and live flows compare exactly: live flows are parsed from ``dump-flows --no-stats``, and a
desired flow whose authored text is not byte-identical to OVS's rendering is canonicalised once
through ``ovs-ofctl parse-flows`` (OVS's own normaliser: field order, ``ip,tcp`` → ``tcp``,
``mod_dl_src`` → ``set_field``, ``ct()`` argument order, …) and the answer cached. That call blocks:
asyncio code runs it in a worker thread (see ``FlowReconciler.resync``), never on the event loop.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PRIORITY = 32768
FlowKey = tuple[int, int, str]  # (table, priority, match): unique within a bridge
AuthoredFlow = tuple[int, int, str, str]  # (table, priority, match, actions) as written
_META_KEYS = frozenset(
    {
        "cookie", "table", "duration", "n_packets", "n_bytes", "idle_age", "hard_age",
        "idle_timeout", "hard_timeout", "importance", "reset_counts", "no_packet_counts",
        "no_byte_counts", "send_flow_rem", "check_overlap", "out_port", "out_group",
    }
)  # fmt: skip


class FlowError(ValueError):
    """A flow that cannot be rendered or parsed."""


class Flow(BaseModel):
    """One OpenFlow flow. ``match`` and ``actions`` are in ovs-ofctl syntax."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: int = Field(ge=0, le=254)
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=65535)
    # ovs-ofctl flow text has no whitespace inside match or actions.
    match: str = Field(default="", pattern=r"^\S*$")
    actions: str = Field(pattern=r"^\S+$")
    cookie: int = Field(default=0, ge=0, lt=1 << 64)

    @property
    def key(self) -> FlowKey:
        return (self.table, self.priority, self.match)

    def spec(self) -> str:
        """table, priority and match: what strict modify/delete address a flow by."""
        m = f",{self.match}" if self.match else ""
        return f"table={self.table},priority={self.priority}{m}"

    def render(self, cookie: int | None = None) -> str:
        c = self.cookie if cookie is None else cookie
        return f"cookie={c:#x},{self.spec()} actions={self.actions}"


LiveFlow = tuple[int, str]  # (cookie, actions) of a live flow


def _parse_line(line: str) -> tuple[FlowKey, int, str]:
    head, sep, actions = line.strip().partition(" actions=")
    if not sep:
        raise FlowError(f"not a flow line: {line!r}")
    cookie, table, priority, match = 0, 0, DEFAULT_PRIORITY, ""
    for segment in head.rstrip(",").split(", "):
        if not segment:
            continue
        name, _, value = segment.partition("=")
        if name in _META_KEYS:
            if name == "cookie":
                cookie = int(value, 16)
            elif name == "table":
                table = int(value)
            continue
        if name == "priority":
            prio, _, match = value.partition(",")
            priority = int(prio)
        else:
            match = segment
    return (table, priority, match), cookie, actions


def parse_dump_line(line: str) -> Flow:
    """Parse one line of ``ovs-ofctl dump-flows [--no-stats]`` into a :class:`Flow`."""
    (table, priority, match), cookie, actions = _parse_line(line)
    return Flow(table=table, priority=priority, match=match, actions=actions, cookie=cookie)


def parse_dump(text: str) -> list[Flow]:
    return [parse_dump_line(line) for line in text.splitlines() if " actions=" in line]


# The shape of every ``--no-stats`` line that carries no timeouts or flags: parsed by one regex
# scan of the whole text, which is several times faster than splitting line by line.
_COMMON_LINE = re.compile(
    r"^ (?:cookie=0x([0-9a-f]+), )?(?:table=(\d+), )?(?:priority=(\d+),?)?(\S*) ?actions=(\S+)$", re.M
)


def parse_dump_index(text: str) -> dict[FlowKey, LiveFlow]:
    """The live table as key → (cookie, actions): the full-resync hot path, no model objects."""
    rows = _COMMON_LINE.findall(text)
    if len(rows) == text.count(" actions="):
        return {
            (int(t or 0), int(p) if p else DEFAULT_PRIORITY, m): (int(c or "0", 16), a)
            for c, t, p, m, a in rows
        }
    index = {}  # some line has another shape (timeouts, flags): take the general parser
    for line in text.splitlines():
        if " actions=" in line:
            key, cookie, actions = _parse_line(line)
            index[key] = (cookie, actions)
    return index


def _parse_flow_mod_line(line: str) -> tuple[int, int, str, str]:
    """Parse ``parse-flows`` output: ``OFPT_FLOW_MOD (...): ADD [table:N ][priority=P,]match actions=A``."""
    body = " " + line.split("): ADD ", 1)[1]
    head, _, actions = body.partition(" actions=")
    head = head.strip()
    table = 0
    if head.startswith("table:"):
        tpart, _, head = head.partition(" ")
        table = int(tpart[6:])
    priority, match = DEFAULT_PRIORITY, head
    if head.startswith("priority="):
        prio, _, match = head[9:].partition(",")
        priority = int(prio)
    return table, priority, match, actions


class Canonicalizer:
    """Maps authored flow text to OVS's canonical rendering, asking ``ovs-ofctl parse-flows``.

    Blocking (a subprocess for what is not cached yet): from asyncio, call it in a worker thread.
    """

    def __init__(self) -> None:
        self._cache: dict[AuthoredFlow, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def canonical(self, flows: Iterable[Flow]) -> dict[AuthoredFlow, tuple[str, str]]:
        """(table, priority, match, actions) → canonical (match, actions), for every given flow."""
        wanted = {(f.table, f.priority, f.match, f.actions) for f in flows}
        missing = [k for k in wanted if k not in self._cache]
        if missing:
            self._cache.update(self._ask_ovs(missing))
        return {k: self._cache[k] for k in wanted}

    @staticmethod
    def _ask_ovs(keys: list[AuthoredFlow]) -> Mapping[AuthoredFlow, tuple[str, str]]:
        text = "".join(f"table={t},priority={p}{',' + m if m else ''} actions={a}\n" for t, p, m, a in keys)
        proc = subprocess.run(
            ["ovs-ofctl", "-O", "OpenFlow15", "parse-flows", "-"],
            input=text, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise FlowError(f"ovs-ofctl cannot parse the desired flows: {proc.stderr.strip()}")
        rendered = [ln for ln in proc.stdout.splitlines() if "): ADD " in ln]
        if len(rendered) != len(keys):
            raise FlowError(f"parse-flows returned {len(rendered)} flows for {len(keys)}")
        out = {}
        for key, line in zip(keys, rendered, strict=True):
            t, p, m, a = _parse_flow_mod_line(line)
            if (t, p) != key[:2]:
                raise FlowError(f"parse-flows reordered flows: {key} vs {line}")
            out[key] = (m, a)
        return out
