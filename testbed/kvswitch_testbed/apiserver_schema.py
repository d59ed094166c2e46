"""Structural-schema handling of custom resources: pruning, defaulting and validation.

KMock stores custom resources as sent. kube-apiserver prunes unknown fields (or refuses them with
``fieldValidation=Strict``, as kubectl asks), drops non-nullable nulls, applies defaults and validates
against the CRD's openAPIV3Schema with Go regexp semantics. Our tests rely on a VSwitchConfig with a
bad CIDR being refused with 422, exactly as a real cluster would.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jsonschema
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

_ROOT_FIELDS = frozenset({"apiVersion", "kind", "metadata"})


class Cause(NamedTuple):
    """One entry of the Status ``details.causes`` of a 422 Invalid answer."""

    field: str
    reason: str
    message: str


@functools.lru_cache(maxsize=512)
def go_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Go (RE2) pattern: ``$`` means end of text there, not "before a final newline"."""
    if "(?m" in pattern:
        return re.compile(pattern)
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(r"\Z" if nxt == "z" and not in_class else pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            out.append(char)
            i += 1
            for lead in ("^", "]"):  # a leading ']' (after an optional '^') is a literal
                if i < len(pattern) and pattern[i] == lead:
                    out.append(lead)
                    i += 1
            continue
        elif char == "$":
            out.append(r"\Z")
            i += 1
            continue
        out.append(char)
        i += 1
    return re.compile("".join(out))


_FORMATS = jsonschema.FormatChecker(formats=())
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _register_formats() -> None:
    def date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not _RFC3339.fullmatch(value):
            return False
        datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00").replace(" ", "T"))
        return True

    def date(value: object) -> bool:
        return not isinstance(value, str) or bool(datetime.date.fromisoformat(value))

    def int_range(bits: int) -> Any:
        def check(value: object) -> bool:
            return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

        return check

    def ip(version: int) -> Any:
        def check(value: object) -> bool:
            return not isinstance(value, str) or ipaddress.ip_address(value).version == version

        return check

    def cidr(value: object) -> bool:
        return not isinstance(value, str) or bool(ipaddress.ip_network(value, strict=False))

    def byte(value: object) -> bool:
        if isinstance(value, str):
            base64.b64decode(value, validate=True)  # raises binascii.Error
        return True

    def pattern(regex: str) -> Any:
        compiled = re.compile(regex)

        def check(value: object) -> bool:
            return not isinstance(value, str) or bool(compiled.fullmatch(value))

        return check

    checks: dict[str, Any] = {
        "date-time": date_time,
        "date": date,
        "int32": int_range(32),
        "int64": int_range(64),
        "ipv4": ip(4),
        "ipv6": ip(6),
        "cidr": cidr,
        "byte": byte,
        "uuid": pattern(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"),
        "mac": pattern(r"([0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}"),
        "hostname": pattern(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
    }
    for name, fn in checks.items():
        _FORMATS.checks(name, raises=(ValueError, binascii.Error))(fn)


_register_formats()
_DRAFT4_TYPE = jsonschema.Draft4Validator.VALIDATORS["type"]


def _type(
    validator: Validator, types: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if instance is None and schema.get("nullable") is True:
        return
    yield from _DRAFT4_TYPE(validator, types, instance, schema)


def _pattern(
    validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not go_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _required(
    validator: Validator, required: Iterable[str], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "object"):
        for prop in required:
            if prop not in instance:
                yield ValidationError(f"{prop!r} is a required property", path=[prop])


_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft4Validator, {"type": _type, "pattern": _pattern, "required": _required}
)


def field_path(parts: Iterable[str | int]) -> str:
    """``spec.conditions[0].status``, as the API server names fields in its errors."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
    return "object"


def _cause(err: ValidationError) -> Cause:
    field = field_path(err.absolute_path)
    value = json.dumps(err.instance, sort_keys=True) if err.validator != "required" else ""
    rule: Any = err.validator_value
    instance: Any = err.instance
    match err.validator:
        case "required":
            return Cause(field, "FieldValueRequired", "Required value")
        case "enum":
            supported = ", ".join(json.dumps(v) for v in rule)
            return Cause(
                field, "FieldValueNotSupported", f"Unsupported value: {value}: supported values: {supported}"
            )
        case "pattern":
            return Cause(
                field, "FieldValueInvalid", f"Invalid value: {value}: {field} in body should match '{rule}'"
            )
        case "type":
            actual = _json_type(err.instance)
            message = f'Invalid value: "{actual}": {field} in body must be of type {rule}: "{actual}"'
            return Cause(field, "FieldValueTypeInvalid", message)
        case "format":
            return Cause(
                field,
                "FieldValueInvalid",
                f"Invalid value: {value}: {field} in body must be of type {rule}: {value}",
            )
        case "maxLength":
            return Cause(field, "FieldValueTooLong", f"Too long: may not be more than {rule} bytes")
        case "minLength":
            message = f"Invalid value: {value}: {field} in body should be at least {rule} chars long"
            return Cause(field, "FieldValueInvalid", message)
        case "maximum" | "minimum":
            relation = "less" if err.validator == "maximum" else "greater"
            message = f"Invalid value: {value}: {field} in body should be {relation} than or equal to {rule}"
            return Cause(field, "FieldValueInvalid", message)
        case "maxItems":
            return Cause(
                field, "FieldValueTooMany", f"Too many: {len(instance)}: must have at most {rule} items"
            )
        case "minItems":
            message = f"Invalid value: {len(instance)}: {field} in body should have at least {rule} items"
            return Cause(field, "FieldValueInvalid", message)
    return Cause(field, "FieldValueInvalid", f"Invalid value: {value}: {err.message}")


class StructuralSchema:
    """One version's openAPIV3Schema of a CRD, applied to objects on every write."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema: dict[str, Any] = copy.deepcopy(dict(schema))
        self._validator = _Validator(self.schema, format_checker=_FORMATS)

    def prune(self, obj: dict[str, Any]) -> list[str]:
        """Drop unknown fields and non-nullable nulls, apply defaults (in place); return the unknown paths."""
        unknown: list[str] = []
        self._prune(obj, self.schema, [], unknown, root=True)
        return unknown

    def _prune(
        self,
        value: Any,
        schema: Mapping[str, Any],
        path: list[str | int],
        unknown: list[str],
        *,
        root: bool = False,
    ) -> None:
        if isinstance(value, dict):
            props: Mapping[str, Any] = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
            embedded = bool(schema.get("x-kubernetes-embedded-resource"))
            for key in list(value):
                if (root or embedded) and key in _ROOT_FIELDS and key not in props:
                    continue
                if root and key == "metadata":
                    continue
                sub = props.get(key) if key in props else extra if isinstance(extra, Mapping) else None
                if sub is None:
                    if not (preserve or extra is True):
                        unknown.append(field_path([*path, key]))
                        del value[key]
                    continue
                if value[key] is None and not sub.get("nullable"):
                    del value[key]
                    continue
                self._prune(value[key], sub, [*path, key], unknown)
            for key, sub in props.items():
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
        elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
            for idx, item in enumerate(value):
                self._prune(item, schema["items"], [*path, idx], unknown)

    def validate(self, obj: Mapping[str, Any]) -> list[Cause]:
        errors = sorted(self._validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
        return [
            _cause(err) for err in errors if not (err.absolute_path and err.absolute_path[0] == "metadata")
        ]
