#!/usr/bin/env python3
"""Helm post-delete hook: wait until the cleanup DaemonSet reports every node clean.

Each cleanup pod removes k-vswitch's files from its node and turns Ready only once none is left
(its readiness probe is ``uninstall-cni.sh --check``). Helm waits for hook Jobs, not DaemonSets,
so this Job is what makes ``helm uninstall`` return only after all nodes are clean, or fail
naming the nodes that are not. Standard library only: it runs in the agent image's Python.

Environment: DAEMONSET (name), TIMEOUT_SECONDS; NAMESPACE, KUBE_API_URL, KUBE_TOKEN_FILE and
KUBE_CA_FILE default to the pod's in-cluster service account.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def cleanup_done(ds: dict[str, Any]) -> bool:
    """True once the DaemonSet controller has seen this DaemonSet and all its pods are Ready."""
    meta, status = ds.get("metadata") or {}, ds.get("status") or {}
    if int(status.get("observedGeneration", 0)) < int(meta.get("generation", 1)):
        return False  # desiredNumberScheduled not computed yet: 0 would look like "done"
    desired = int(status.get("desiredNumberScheduled", 0))
    return int(status.get("numberReady", 0)) >= desired


def pending_nodes(pods: list[dict[str, Any]]) -> list[str]:
    """Nodes whose cleanup pod is not Ready (or not even scheduled: shown as '?')."""
    pending = []
    for pod in pods:
        conditions = (pod.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if not ready:
            pending.append((pod.get("spec") or {}).get("nodeName") or "?")
    return sorted(pending)


class Api:
    def __init__(self) -> None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        default_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.url = os.environ.get("KUBE_API_URL", default_url).rstrip("/")
        token_file = os.environ.get("KUBE_TOKEN_FILE", f"{SA_DIR}/token")
        ca_file = os.environ.get("KUBE_CA_FILE", f"{SA_DIR}/ca.crt")
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=ca_file) if self.url.startswith("https") else None

    def get(self, path: str, **query: str) -> dict[str, Any]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with open(self.token_file) as f:  # re-read: bound tokens rotate
            token = f.read().strip()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=10, context=self.context) as rsp:
            body: dict[str, Any] = json.load(rsp)
            return body


def main() -> int:
    name = os.environ["DAEMONSET"]
    timeout = float(os.environ.get("TIMEOUT_SECONDS", "240"))
    interval = float(os.environ.get("POLL_SECONDS", "2"))
    namespace = os.environ.get("NAMESPACE") or Path(f"{SA_DIR}/namespace").read_text().strip()
    api = Api()
    ds_path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            ds = api.get(ds_path)
        except OSError as exc:  # URLError and HTTPError included: the API may blip, keep trying
            ds, note = {}, f"cannot read daemonset {name}: {exc}"
        else:
            if cleanup_done(ds):
                nodes = (ds.get("status") or {}).get("desiredNumberScheduled", 0)
                print(f"k-vswitch removed from all {nodes} nodes", flush=True)
                return 0
            status = ds.get("status") or {}
            note = f"{status.get('numberReady', 0)}/{status.get('desiredNumberScheduled', '?')} nodes clean"
        if note != last:
            print(note, flush=True)
            last = note
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)

    selector = ",".join(
        f"{k}={v}"
        for k, v in sorted(((ds.get("spec") or {}).get("selector") or {}).get("matchLabels", {}).items())
    )
    nodes = "unknown"
    if selector:  # never list the whole namespace
        try:
            pods = api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector).get("items", [])
            nodes = ", ".join(pending_nodes(pods)) or nodes
        except OSError as exc:
            nodes = f"unknown ({exc})"
    print(
        f"k-vswitch cleanup did not finish within {timeout:.0f}s on: {nodes}. On each of them remove "
        "/etc/cni/net.d/10-k-vswitch.conflist, the k-vswitch-cni wrapper and k-vswitch.d in /opt/cni/bin.",
        file=sys.stderr,
        flush=True,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
