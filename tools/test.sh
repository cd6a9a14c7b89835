#!/usr/bin/env bash
# Install the project, its test tools and the system packages the tests use, then lint and run every test.
#   bash tools/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages (Debian), each installed on its own so that one unavailable package does not stop the
# others: Chromium renders the report in a real browser;
# podman with the OCI runtime that circle-ci/containers.conf names (runc), buildah and debootstrap build and
# run the container image.
packages=(chromium podman runc buildah debootstrap uidmap fuse-overlayfs slirp4netns)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    $SUDO apt-get update -qq >/tmp/clinicadl-app-apt.log 2>&1 || true
    for package in "${missing[@]}"; do
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$package" \
        >>/tmp/clinicadl-app-apt.log 2>&1 || echo "apt-get could not install $package (see /tmp/clinicadl-app-apt.log)"
    done
  fi
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check clinicadl_app tests tools benchmarks
# one worker per core, at most 4 (tests/conftest.py pins each to its core and hands out the heaviest modules
# first); TEST_WORKERS=1 runs them one after the other
workers=${TEST_WORKERS:-$(.venv/bin/python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
if [ "$workers" -gt 1 ]; then
  .venv/bin/python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
else
  .venv/bin/python -m pytest "$@"
fi

# The container image: built with podman from the unchanged Dockerfile and run read-only on the demo.
# In CI (CI=true) it must run: a missing prerequisite fails with one line naming it.
if [ "${SKIP_CONTAINER_TEST:-0}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "container test skipped (SKIP_CONTAINER_TEST=1)"
  exit 0
fi
bash circle-ci/container_prerequisites.sh
timeout 45m bash circle-ci/test_container_local.sh
