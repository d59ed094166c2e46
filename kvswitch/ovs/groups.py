"""OpenFlow groups as frozen models, written in the text ``ovs-ofctl -O OpenFlow15 dump-groups``
prints, so that desired and live groups compare as strings (a test checks the round trip)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

_GROUP_ID = re.compile(r"group_id=(\d+)")


class Group(BaseModel):
    model_config = ConfigDict(frozen=True)

    group_id: int = Field(ge=0, le=0xFFFFFF00)  # above are OpenFlow's reserved ids
    type: str = "select"
    selection_method: str | None = None
    buckets: tuple[str, ...] = ()  # each "bucket=bucket_id:N,weight:W,actions=..."

    def render(self) -> str:
        parts = [f"group_id={self.group_id}", f"type={self.type}"]
        if self.selection_method:
            parts.append(f"selection_method={self.selection_method}")
        parts.extend(self.buckets)
        return ",".join(parts)


def parse_group_dump(text: str) -> dict[int, str]:
    """``dump-groups`` output → {group id: its text}."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _GROUP_ID.match(line)
        if m:
            out[int(m.group(1))] = line
    return out
