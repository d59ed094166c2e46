#!/bin/sh
# Removes what k-vswitch put on a node: the conflist the agent wrote, the wrappers that carry our
# mark and the bundle. The node's own host-local/portmap stay. Run by the cleanup DaemonSet of
# `helm uninstall` (post-delete hook); that pod's readiness probe is `uninstall-cni.sh --check`.
#   uninstall-cni.sh           remove, exit
#   uninstall-cni.sh --hold    remove, then sleep until the pod is deleted
#   uninstall-cni.sh --check   exit 0 when nothing of ours is left, else name what is
set -eu

BIN="${CNI_BIN_DIR:-/host/cni-bin}"
CONF="${CNI_CONF_DIR:-/host/cni-conf}"
CONFLIST="10-k-vswitch.conflist"
MARK="# k-vswitch-wrapper"

ours() { head -n 2 "$1" 2>/dev/null | grep -q "^$MARK"; }

leftovers() {
  if [ -e "$CONF/$CONFLIST" ]; then echo "$CONF/$CONFLIST"; fi
  for f in "$BIN"/*; do
    if [ -f "$f" ] && ours "$f"; then echo "$f"; fi
  done
  if [ -e "$BIN/k-vswitch.d" ]; then echo "$BIN/k-vswitch.d"; fi
}

if [ "${1:-}" = "--check" ]; then
  left="$(leftovers)"
  if [ -n "$left" ]; then
    echo "k-vswitch files still on this node:" $left
    exit 1
  fi
  exit 0
fi

# The conflist first: from then on the runtime hands no new pod to k-vswitch-cni.
rm -f "$CONF/$CONFLIST"
for f in "$BIN"/*; do
  if [ -f "$f" ] && ours "$f"; then rm -f "$f"; fi
done
rm -rf "$BIN/k-vswitch.d"
echo "uninstall-cni: removed k-vswitch from $CONF and $BIN"

if [ "${1:-}" = "--hold" ]; then
  exec sleep infinity
fi
