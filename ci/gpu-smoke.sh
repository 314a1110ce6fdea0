#!/usr/bin/env bash
# GPU smoke run: on a GPU machine that already has a CUDA build of torch, install the plugin
# from wheels handed to us (no network) and run the shipped suite, JUnit into OUT_DIR.
#
#   ci/gpu-smoke.sh WHEEL_DIR OUT_DIR [extra pytest args...]
#
# WHEEL_DIR holds pytest_gpuconform-*.whl plus any dependency wheels the machine lacks
# (e.g. junitparser). Budget: under 5 minutes; the suite run is capped by SMOKE_TIMEOUT.
set -euo pipefail
wheels=${1:?usage: gpu-smoke.sh WHEEL_DIR OUT_DIR [pytest args...]}
out=${2:?usage: gpu-smoke.sh WHEEL_DIR OUT_DIR [pytest args...]}
shift 2
python=${PYTHON:-python3}
mkdir -p "$out"
started=$(date +%s)

# Dependencies the machine already has (torch, numpy, pytest, ...) are kept; only what is
# missing comes from WHEEL_DIR. --no-index: never reach for the network.
"$python" -m pip install -q --no-index --find-links "$wheels" "$wheels"/pytest_gpuconform-*.whl \
  2>&1 | tee "$out/pip.log"
"$python" -m pip list 2>/dev/null | grep -iE '^(torch|pytest|pytest-xdist|nvidia-ml-py|junitparser|pytest-gpuconform) ' \
  > "$out/versions.txt" || true
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$out/nvidia-smi.txt"
"$python" -m pytest_gpuconform.cli inventory -o "$out/inventory.json"

workdir=$(mktemp -d)
cd "$workdir"   # an empty directory: proves the installed suite is found without a checkout
set +e
timeout "${SMOKE_TIMEOUT:-270}" "$python" -m pytest --gpuconform -p no:cacheprovider -rs \
  --junitxml="$out/junit.xml" -o junit_logging=system-out "$@" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
set -e
echo "gpu-smoke: pytest exit $rc after $(( $(date +%s) - started )) s" | tee -a "$out/pytest.log"
[ "$rc" = 5 ] && { echo "gpu-smoke: no tests ran" >&2; exit 1; }
exit "$rc"
