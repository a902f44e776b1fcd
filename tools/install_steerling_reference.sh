#!/usr/bin/env bash
# Installs the Steerling PyTorch reference (the parity oracle) into a venv.
# The steerling 0.2.0 wheel declares Python>=3.13 and pins an older torch, but
# its model code runs on 3.11 with torch 2.13; its runtime deps come from the
# `parity` extra in setup.cfg. Usage: tools/install_steerling_reference.sh PYTHON
set -euo pipefail
PY=${1:-python3}
if "$PY" -c "import steerling.models" 2>/dev/null; then
  exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$PY" -m pip download -q --no-deps --ignore-requires-python steerling==0.2.0 -d "$dir"
"$PY" -m pip install -q --no-deps --ignore-requires-python "$dir"/steerling-0.2.0-*.whl
"$PY" -c "import steerling.models" || { echo "steerling reference failed to import" >&2; exit 1; }
echo "installed the steerling 0.2.0 reference"
