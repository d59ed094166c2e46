"""Entry points of the two operators: ``k-vswitchd`` (per node) and ``k-vswitch-controller``."""

from __future__ import annotations

import importlib
import logging
import os

import kopf


def _run(
    modules: tuple[str, ...],
    standalone: bool,
    metrics_port: int,
    metrics_address: str,
    peering_name: str | None = None,
) -> None:
    logging.basicConfig(
        level=os.environ.get("KVSWITCH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from kvswitch import metrics

    metrics.serve(metrics_port, metrics_address)  # Prometheus /metrics (docs/observability.md)
    for module in modules:
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
    from kvswitch.config import AgentSettings

    settings = AgentSettings.from_env()
    _run(("kvswitch.handlers.agent",), True, settings.metrics_port, settings.metrics_address)


def controller() -> None:
    """Peering (unless KVSWITCH_STANDALONE=1) keeps a second replica paused: leader-safe."""
    from kvswitch.config import ControllerSettings

    settings = ControllerSettings.from_env()
    _run(
        ("kvswitch.handlers.controller", "kvswitch.handlers.controller_metrics"),
        standalone=os.environ.get("KVSWITCH_STANDALONE") == "1",
        metrics_port=settings.metrics_port,
        metrics_address=settings.metrics_address,
        peering_name=os.environ.get("KVSWITCH_PEERING_NAME"),  # the chart's ClusterKopfPeering
    )
