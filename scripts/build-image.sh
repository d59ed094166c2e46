#!/bin/sh
# Builds the k-vswitch image from the Dockerfile with podman, without a container registry:
# `debian:bookworm-slim` (the Dockerfile's base) is made here from Debian's packages with
# mmdebstrap and imported as localhost/debian:bookworm-slim, once; later builds reuse it, and podman's
# layer cache makes a rebuild of unchanged sources take seconds. RUN steps reach Debian's and PyPI's
# servers through the host's network.
#
#   scripts/build-image.sh                  build $IMAGE (default: k-vswitch:<chart appVersion>)
#   scripts/build-image.sh --base-only      only make sure the base image exists
#
# Environment: IMAGE, CONTAINERS_CONF (default: scripts/containers.conf), DEBIAN_MIRROR,
# PIP_CA (CA bundle handed to pip as the build secret pip-ca; default: the host's, if present).
set -eu

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/scripts/containers.conf}"
APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/charts/k-vswitch/Chart.yaml")"
IMAGE="${IMAGE:-k-vswitch:$APP_VERSION}"
BASE="localhost/debian:bookworm-slim"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PIP_CA="${PIP_CA-/etc/ssl/certs/ca-certificates.crt}"
podman() { command podman --runtime runc --cgroup-manager=cgroupfs "$@"; }

if ! podman image exists "$BASE"; then
  echo "build-image: making $BASE from Debian's packages (mmdebstrap, minbase)"
  start=$(date +%s)
  # Like Docker's slim images: no man pages, docs (copyrights kept), info or translations.
  mmdebstrap --quiet --variant=minbase --mode=root \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --aptopt='Acquire::Languages "none"' \
    bookworm - \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY bookworm-security main" \
    | podman import --change 'CMD ["bash"]' - "$BASE" >/dev/null
  echo "build-image: $BASE made in $(( $(date +%s) - start ))s"
fi
if [ "${1:-}" = "--base-only" ]; then exit 0; fi

secret=""
if [ -n "$PIP_CA" ] && [ -s "$PIP_CA" ]; then secret="--secret=id=pip-ca,src=$PIP_CA"; fi
old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
# --pull=never: the base must be the local one (no registry here); --layers: reuse unchanged steps.
# shellcheck disable=SC2086
podman build --pull=never --layers --network=host $secret -t "$IMAGE" "$ROOT"
# The image this build replaced is only cache now (its layers stay shared where unchanged).
new=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "build-image: $IMAGE built in $(( $(date +%s) - start ))s, $(( size / 1000000 )) MB"
