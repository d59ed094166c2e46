# k-vswitch: one image for k-vswitchd, k-vswitch-controller and the node-side CNI install.
#   docker build -t REGISTRY/k-vswitch:0.1.0 .      (the chart's image.repository / image.tag)
#   make image                                       (podman, here: scripts/build-image.sh)
#
# Debian's own Python in every stage: the venv built in `build` runs unchanged in the final stage,
# and the CNI bundle carries that same interpreter onto the nodes.

# Only the OVSDB schema is taken from here: the Python IDL reads it from
# /usr/share/openvswitch/vswitch.ovsschema, which Debian ships with the daemons we do not want.
FROM debian:bookworm-slim AS ovs-schema
# Not pinning package versions (DL3008): Debian replaces them on every point release, the
# bookworm tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openvswitch-switch \
 && rm -rf /var/lib/apt/lists/*

FROM debian:bookworm-slim AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv containernetworking-plugins \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvswitch ./kvswitch
# Behind a TLS-intercepting proxy pip needs that proxy's CA: pass it as the optional build secret
# `pip-ca` (`--secret id=pip-ca,src=CA-FILE`; scripts/build-image.sh passes the host's bundle).
# A secret is mounted for this step only and never enters a layer; without one pip uses its own.
RUN --mount=type=secret,id=pip-ca \
    python3 -m venv /opt/k-vswitch/venv \
 && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /opt/k-vswitch/venv/bin/pip install --no-cache-dir /src
# What install-cni.sh copies onto each node: Python, the package, host-local, portmap, and every
# shared library they need (host glibc versions vary; the bundle brings its own loader).
COPY scripts/build-cni-bundle.py /tmp/
RUN /opt/k-vswitch/venv/bin/python /tmp/build-cni-bundle.py /opt/k-vswitch/cni-bundle \
      --dist kvswitch --entry k-vswitch-cni \
      --binary /usr/lib/cni/host-local --binary /usr/lib/cni/portmap

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="k-vswitch" \
      org.opencontainers.image.description="Kubernetes networking on Open vSwitch: agent, controller, CNI plugin" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3: runs the venv. openvswitch-common: ovs-ofctl (flows go in as bundles) and ovs-vsctl.
# nftables: the agent's SNAT table. procps: sysctl.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 openvswitch-common nftables procps \
 && rm -rf /var/lib/apt/lists/*
COPY --from=ovs-schema /usr/share/openvswitch/vswitch.ovsschema /usr/share/openvswitch/vswitch.ovsschema
COPY --from=build /opt/k-vswitch /opt/k-vswitch
COPY scripts/install-cni.sh scripts/uninstall-cni.sh scripts/wait-for-cleanup.py /usr/local/lib/k-vswitch/
ENV PATH="/opt/k-vswitch/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Non-root unless the pod says otherwise: the chart runs the controller and the cleanup waiter as
# 65532, and only the agent and the node-file containers as root (root-owned host sockets/files).
USER 65532:65532
CMD ["k-vswitchd"]
