#!/bin/sh
# The agent's init container: puts the CNI bundle into the node's CNI bin dir (mounted at
# $CNI_BIN_DIR) and installs its wrappers: k-vswitch-cni always, host-local and portmap only where
# the node has none of its own (we never replace a runtime's plugins). Rerun on every agent start;
# an upgrade copies the new bundle beside the old one, then swaps each wrapper with one rename, so a
# CNI call in flight never sees a half-written file.
set -eu

SRC="${KVSWITCH_BUNDLE:-/opt/k-vswitch/cni-bundle}"
DEST="${CNI_BIN_DIR:-/host/cni-bin}"
MARK="# k-vswitch-wrapper"

id="$(cat "$SRC/BUILD_ID")"
store="$DEST/k-vswitch.d"
mkdir -p "$store"
if [ ! -f "$store/$id/BUILD_ID" ]; then
  rm -rf "$store/.partial-$id"
  cp -pR "$SRC" "$store/.partial-$id"
  mv "$store/.partial-$id" "$store/$id"
fi

ours() { head -n 2 "$1" 2>/dev/null | grep -q "^$MARK"; }

for wrapper in "$SRC"/wrappers/*; do
  name="${wrapper##*/}"
  if [ -e "$DEST/$name" ] && ! ours "$DEST/$name"; then
    echo "install-cni: keeping the node's own $name"
    continue
  fi
  cp "$wrapper" "$DEST/.$name.k-vswitch-new"
  chmod 0755 "$DEST/.$name.k-vswitch-new"
  mv -f "$DEST/.$name.k-vswitch-new" "$DEST/$name"
  echo "install-cni: installed $name (bundle $id)"
done

# Older bundles: no wrapper points at them any more.
for old in "$store"/*; do
  if [ "$old" != "$store/$id" ]; then rm -rf "$old"; fi
done
