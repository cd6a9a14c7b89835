#!/usr/bin/env bash
# Install the project and its test tools in .venv, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check clinicadl_app tests tools benchmarks
exec .venv/bin/python -m pytest "$@"
