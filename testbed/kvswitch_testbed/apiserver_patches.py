"""The three PATCH flavours of the Kubernetes API, applied to plain JSON documents.

KMock merges every dict body into the object; kopf needs RFC 6902 JSON patches with a ``test`` op
(finalizers), kubectl and kubernetes-asyncio send strategic merge patches for built-in kinds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

# Strategic-merge metadata of the built-in types we serve, keyed by field name rather than by Go type:
# lists of objects merged by a key, and lists of scalars merged as sets. Any other list is replaced.
MERGE_KEYS: Mapping[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "ownerReferences": ("uid",),
    "addresses": ("type",),
    "taints": ("key",),
    "imagePullSecrets": ("name",),
    "hostAliases": ("ip",),
    "images": ("names",),
}
PRIMITIVE_SET_LISTS = frozenset({"finalizers", "podCIDRs"})


class PatchError(ValueError):
    """The patch cannot be applied (the API answers 422), e.g. a failed ``test`` op."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}: must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(token: str, size: int, *, allow_end: bool) -> int:
    if allow_end and token == "-":
        return size
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r}")
    idx = int(token)
    if idx > size or (idx == size and not allow_end):
        raise PatchError(f"array index {idx} out of bounds (size {size})")
    return idx


def _walk(doc: Any, tokens: Sequence[str], path: str) -> Any:
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                raise PatchError(f"path {path!r} does not exist: missing key {token!r}")
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(token, len(doc), allow_end=False)]
        else:
            raise PatchError(f"path {path!r} does not exist: {token!r} is not in a container")
    return doc


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and bool(a == b)


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) on a copy of ``doc``."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, Mapping) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        result = _apply_op(result, op)
    return result


def _add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), allow_end=True), value)
    else:
        raise PatchError(f"cannot add at {path!r}: the parent is not a container")
    return doc


def _remove(doc: Any, tokens: list[str], path: str) -> tuple[Any, Any]:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"cannot remove {path!r}: it does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(last, len(parent), allow_end=False))
    raise PatchError(f"cannot remove {path!r}: the parent is not a container")


def _apply_op(doc: Any, op: Mapping[str, Any]) -> Any:
    name, path = op["op"], str(op["path"])
    tokens = _pointer(path)
    if name in ("add", "replace", "test") and "value" not in op:
        raise PatchError(f"operation {name!r} at {path!r} has no value")
    match name:
        case "add":
            return _add(doc, tokens, copy.deepcopy(op["value"]), path)
        case "remove":
            return _remove(doc, tokens, path)[0]
        case "replace":
            _walk(doc, tokens, path)  # must exist
            if not tokens:
                return copy.deepcopy(op["value"])
            doc, _ = _remove(doc, tokens, path)
            return _add(doc, tokens, copy.deepcopy(op["value"]), path)
        case "move" | "copy":
            source = str(op.get("from", ""))
            src_tokens = _pointer(source)
            if name == "move":
                if tokens[: len(src_tokens)] == src_tokens and len(tokens) > len(src_tokens):
                    raise PatchError(f"cannot move {source!r} into its own child {path!r}")
                doc, value = _remove(doc, src_tokens, source)
            else:
                value = copy.deepcopy(_walk(doc, src_tokens, source))
            return _add(doc, tokens, value, path)
        case "test":
            actual = _walk(doc, tokens, path)
            if not _json_equal(actual, op["value"]):
                raise PatchError(f"test failed at {path!r}: expected {op['value']!r}, found {actual!r}")
            return doc
    raise PatchError(f"unknown JSON patch operation {name!r}")


def _merge_key(name: str, items: Sequence[Any]) -> str | None:
    for key in MERGE_KEYS.get(name, ()):
        if any(isinstance(item, Mapping) and key in item for item in items):
            return key
    return None


def _strip_directives(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if not (k == "$patch" or k == "$retainKeys" or k.startswith(("$setElementOrder/", "$deleteFrom")))
        }
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_list(name: str, current: Any, patch: list[Any]) -> list[Any]:
    base = list(current) if isinstance(current, list) else []
    if any(isinstance(item, Mapping) and item.get("$patch") == "replace" for item in patch):
        return [_strip_directives(i) for i in patch if not (isinstance(i, Mapping) and "$patch" in i)]
    if name in PRIMITIVE_SET_LISTS:
        return base + [copy.deepcopy(v) for v in patch if v not in base]
    key = _merge_key(name, patch + base)
    if key is None:
        return [_strip_directives(v) for v in patch]
    for item in patch:
        if not isinstance(item, Mapping):
            raise PatchError(f"strategic merge of {name!r}: expected objects with key {key!r}")
        pos = next(
            (i for i, e in enumerate(base) if isinstance(e, Mapping) and e.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            if pos is not None:
                del base[pos]
        elif pos is None:
            base.append(_strip_directives(item))
        else:
            base[pos] = strategic_merge_patch(base[pos], item)
    return base


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch for the built-in kinds, close enough for tests.

    Lists merge by the keys in MERGE_KEYS (by field name, not by Go type); ``$patch: delete|replace``,
    ``$retainKeys`` and ``$deleteFromPrimitiveList/`` are honoured, ``$setElementOrder/`` is ignored.
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip_directives(patch)
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        elif isinstance(value, Mapping):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    if isinstance(patch.get("$retainKeys"), list):
        keep = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in keep}
    return result
