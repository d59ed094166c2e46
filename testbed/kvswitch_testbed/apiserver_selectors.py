"""Label and field selectors, parsed and matched the way kube-apiserver does it.

KMock ignores ``labelSelector``/``fieldSelector``; kopf (``settings.watching``) and our agents (pods of one
node via ``spec.nodeName=NODE``) depend on them in both list and watch requests.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_NOT_EXISTS = re.compile(rf"!\s*({_KEY})")
_SET = re.compile(rf"({_KEY})\s+(in|notin)\s*\((.*)\)")
_COMPARE = re.compile(rf"({_KEY})\s*(==|=|!=|>|<)\s*(\S*)")
_EXISTS = re.compile(_KEY)
_VALUE_RE = re.compile(_VALUE)


class SelectorError(ValueError):
    """A selector that the real API server would refuse with 400 Bad Request."""


def _split_top_level(text: str) -> Iterator[str]:
    """Split on commas that are not inside ``in (...)`` value sets."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return present
            case "!":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "gt" | "lt":
                try:
                    number = int(value or "")
                except ValueError:
                    return False
                bound = int(self.values[0])
                return number > bound if self.op == "gt" else number < bound
        raise AssertionError(self.op)  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class LabelSelector:
    """Equality- and set-based label selector (``a=b,c!=d,e in (f,g),h notin (i),j,!k,l>1``)."""

    requirements: tuple[LabelRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        requirements: list[LabelRequirement] = []
        if not text.strip():
            return cls()
        for raw in _split_top_level(text):
            part = raw.strip()
            if m := _NOT_EXISTS.fullmatch(part):
                requirements.append(LabelRequirement(m[1], "!"))
            elif m := _SET.fullmatch(part):
                values = tuple(v.strip() for v in m[3].split(","))
                if not all(_VALUE_RE.fullmatch(v) for v in values):
                    raise SelectorError(f"invalid label value in {part!r}")
                requirements.append(LabelRequirement(m[1], m[2], values))
            elif m := _COMPARE.fullmatch(part):
                key, op, value = m[1], m[2], m[3]
                if op in (">", "<"):
                    if not re.fullmatch(r"-?\d+", value):
                        raise SelectorError(
                            f"{part!r}: for 'gt', 'lt' operators, the value must be an integer"
                        )
                    requirements.append(LabelRequirement(key, "gt" if op == ">" else "lt", (value,)))
                    continue
                if not _VALUE_RE.fullmatch(value):
                    raise SelectorError(f"invalid label value: {value!r}")
                requirements.append(LabelRequirement(key, "!=" if op == "!=" else "=", (value,)))
            elif _EXISTS.fullmatch(part):
                requirements.append(LabelRequirement(part, "exists"))
            else:
                raise SelectorError(f"unable to parse requirement: {part!r}")
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(req.matches(labels) for req in self.requirements)


def _split_unescaped(text: str, sep: str) -> Iterator[str]:
    buf: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            buf.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            yield "".join(buf)
            buf = []
        else:
            buf.append(char)
    if escaped:
        raise SelectorError(f"invalid field selector: trailing backslash in {text!r}")
    yield "".join(buf)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of a field for matching; absent fields are the empty string, as in the API."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return ""
        value = value.get(part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return ""


@dataclasses.dataclass(frozen=True)
class FieldSelector:
    """``metadata.name=x,spec.nodeName!=y`` with ``=``, ``==`` and ``!=``; any dotted path is accepted."""

    terms: tuple[tuple[str, bool, str], ...] = ()  # (path, equal?, value)

    @classmethod
    def parse(cls, text: str) -> FieldSelector:
        terms: list[tuple[str, bool, str]] = []
        if not text.strip():
            return cls()
        for raw in _split_unescaped(text, ","):
            part = raw.strip()
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(!=|==|=)(.*)", part)
            if not m:
                raise SelectorError(f"invalid selector: {part!r}; can't understand {part!r}")
            terms.append((m[1], m[2] != "!=", _unescape(m[3].strip())))
        return cls(tuple(terms))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == equal for path, equal, value in self.terms)
