"""CNI protocol constants, the error type and a JSON codec, all standard library only.

The thin entry point imports this module on every exec, so it must not pull in ``json`` (which
imports ``re``), ``enum``, ``typing`` or ``dataclasses``: each costs milliseconds per pod start.
The C scanner and encoder of ``_json`` give the same results as :mod:`json` without those imports.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
FAILPOINT_ENV = "KVSWITCH_CNI_FAILPOINT"


class Code:
    """Error codes: 1-99 are the spec's well-known codes, 100+ are this plugin's own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    NOT_AVAILABLE_LIMITED = 51
    IPAM_FAILED = 100
    OVS_FAILED = 101
    KERNEL_FAILED = 102
    CHECK_FAILED = 103
    INJECTED_FAULT = 110
    INTERNAL = 199


WELL_KNOWN_CODES = frozenset({1, 2, 3, 4, 5, 6, 7, 11, 50, 51})


class CniError(Exception):
    """A failure the runtime sees as ``{"code", "msg", "details"}`` on stdout and a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code}] {self.msg}" + (f": {self.details}" if self.details else "")

    def to_json(self, cni_version: str | None = None) -> str:
        out: dict[str, object] = {
            "cniVersion": cni_version or SPEC_VERSION,
            "code": self.code,
            "msg": self.msg,
        }
        if self.details:
            out["details"] = self.details
        return dumps(out)


def version_key(version: str) -> tuple[int, int, int] | None:
    """``"1.0.0"`` -> ``(1, 0, 0)``; None when it is not a dotted three-part number."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    got, want = version_key(version), version_key(minimum)
    return got is not None and want is not None and got >= want


# --- JSON without importing json --------------------------------------------------------------


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict[str, str] = {}


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed like json.JSONDecoder
_WS = " \t\n\r"


def loads(text: str) -> object:
    """Parse one JSON document; ValueError when it is not exactly one."""
    start = len(text) - len(text.lstrip(_WS))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at offset {exc.value}") from None
    except Exception as exc:
        # The C scanner reports most syntax errors through json.decoder.JSONDecodeError, which
        # it only finds if json.decoder was imported; without it, it fails with SystemError.
        raise ValueError("invalid JSON") from exc
    finally:
        _ScanContext.memo.clear()
    if text[end:].strip(_WS):
        raise ValueError(f"extra data after JSON document at offset {end}")
    return value


def dumps(value: object) -> str:
    """Serialise str/int/float/bool/None/list/dict with ASCII-only escapes, like ``json.dumps``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot serialise {type(value).__name__}")


def version_reply(stdin: bytes) -> str:
    """The VERSION answer: echo the caller's cniVersion (spec 1.x) and list what we speak."""
    cni_version = SPEC_VERSION
    if stdin.strip():
        try:
            conf = loads(stdin.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CniError(Code.DECODE_FAILURE, "cannot decode the VERSION request", str(exc)) from None
        if isinstance(conf, dict) and isinstance(conf.get("cniVersion"), str):
            cni_version = conf["cniVersion"]
    return dumps({"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def cni_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a CNI call consists of (and that delegated plugins get again)."""
    return {k: v for k, v in environ.items() if k.startswith("CNI_") or k == FAILPOINT_ENV}
