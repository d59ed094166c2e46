"""Entry points of the two operators: ``k-vswitchd`` (per node) and ``k-vswitch-controller``."""

from __future__ import annotations

import importlib
import logging
import os

import kopf


def _run(module: str, standalone: bool, peering_name: str | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("KVSWITCH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    importlib.import_module(module)  # registers the handlers
    liveness = os.environ.get("KVSWITCH_LIVENESS_ENDPOINT") or None
    kopf.run(
        standalone=standalone,
        clusterwide=True,
        liveness_endpoint=liveness,
        peering_name=peering_name,
    )


def agent() -> None:
    """Node agents never peer: each one is the only one for its node."""
    _run("kvswitch.handlers.agent", standalone=True)


def controller() -> None:
    """Peering (unless KVSWITCH_STANDALONE=1) keeps a second replica paused: leader-safe."""
    _run(
        "kvswitch.handlers.controller",
        standalone=os.environ.get("KVSWITCH_STANDALONE") == "1",
        peering_name=os.environ.get("KVSWITCH_PEERING_NAME"),  # the chart's ClusterKopfPeering
    )
