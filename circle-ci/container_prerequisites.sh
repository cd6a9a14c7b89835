#!/usr/bin/env bash
# What the local container build-and-run needs, checked one by one: a missing piece fails with one line
# naming it and the package that brings it, instead of an error from deep inside podman.
set -uo pipefail
status=0
need() {  # need COMMAND PACKAGE WHY
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "container test: '$1' is missing ($3); install the Debian package $2 (tools/test.sh does)" >&2
    status=1
  fi
}
need podman podman "builds and runs the image"
need debootstrap debootstrap "makes the Debian base image without a registry"
need newuidmap uidmap "maps the image's non-root user"
need fuse-overlayfs fuse-overlayfs "podman's storage driver here"
if ! command -v crun >/dev/null 2>&1 && ! command -v runc >/dev/null 2>&1; then
  echo "container test: no OCI runtime (runc or crun); install the Debian package runc (tools/test.sh does)" >&2
  status=1
fi
conf="$(dirname "$0")/containers.conf"
named=$(sed -n 's/^ *runtime *= *"\(.*\)".*/\1/p' "$conf")
if [ -n "$named" ] && ! command -v "$named" >/dev/null 2>&1; then
  echo "container test: $conf names the runtime '$named', which is not installed; install the Debian package $named (tools/test.sh does)" >&2
  status=1
fi
exit $status
