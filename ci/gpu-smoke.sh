#!/usr/bin/env bash
# GPU smoke run: on a GPU machine that already has a CUDA build of torch (and pytest,
# pytest-xdist, nvidia-ml-py), install the plugin from wheels handed to us, without network,
# and run the whole shipped suite on its GPU(s), JUnit into OUT_DIR.
#
#   ci/gpu-smoke.sh WHEEL_DIR OUT_DIR [extra pytest args...]
#
# WHEEL_DIR holds pytest_gpuconform-*.whl (pip wheel --no-deps . -w WHEEL_DIR) and the wheels
# of whatever else the machine lacks (junitparser). They are unpacked into a private
# directory put first on PYTHONPATH: the machine's environment (its torch above all) is
# never modified, and no resolver can replace anything.
#
# OUT_DIR gets at most seven files: env.txt (versions, GPUs, install log), inventory.json,
# pytest.log, junit.xml, summary.txt (counts, GEMM TFLOP/s per dtype against the floor,
# memory ratios and AMP errors on CUDA, every failure with its message), nccl.log (NCCL's
# warnings, when any rank wrote some) and exit.txt.
#
# Environment (all optional):
#   PYTHON              interpreter with torch                 (default: python3)
#   SMOKE_TIMEOUT       seconds for the pytest run             (default: 240; the whole script stays under 5 min)
#   SMOKE_EXPECT_GPUS   --gpuconform-expect-gpus: a GPU check that cannot run fails instead of skipping (default: 1)
#   SMOKE_TEST_TIMEOUT  --gpuconform-timeout, deadline of one multi-rank test (default: 60)
#
# Exit code: pytest's (0 all passed, 1 failures), 2 bad arguments, 3 install or preflight
# failed, 124 the run hit SMOKE_TIMEOUT, 5 (pytest's "no tests ran") becomes 1.
set -uo pipefail

usage() { echo "usage: ci/gpu-smoke.sh WHEEL_DIR OUT_DIR [pytest args...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
wheels=$1
out=$2
shift 2
python=${PYTHON:-python3}
budget=${SMOKE_TIMEOUT:-240}
expect_gpus=${SMOKE_EXPECT_GPUS:-1}
test_timeout=${SMOKE_TEST_TIMEOUT:-60}
started=$(date +%s)

[ -d "$wheels" ] || { echo "gpu-smoke: wheel directory $wheels does not exist" >&2; exit 2; }
wheels=$(cd "$wheels" && pwd)
shopt -s nullglob
plugin_wheels=("$wheels"/pytest_gpuconform-*.whl)
all_wheels=("$wheels"/*.whl)
shopt -u nullglob
if [ ${#plugin_wheels[@]} -ne 1 ]; then
  echo "gpu-smoke: expected exactly one pytest_gpuconform-*.whl in $wheels, found ${#plugin_wheels[@]}" >&2
  exit 2
fi
python=$(command -v "$python") || { echo "gpu-smoke: no interpreter ${PYTHON:-python3} (set PYTHON)" >&2; exit 2; }
case $python in /*) ;; *) python="$PWD/$python" ;; esac  # the run happens in another directory
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpuconform-smoke.XXXXXX")
trap 'cd / && rm -rf "$work"' EXIT
site="$work/site"
env_txt="$out/env.txt"
: > "$env_txt"
# Every python below runs in an empty directory: "python -m" and "python -" put the current
# directory first on sys.path, and a checkout there would shadow the wheel.
mkdir -p "$work/run"
cd "$work/run" || exit 2

note() { echo "gpu-smoke: $*" | tee -a "$env_txt"; }
finish() {
  echo "$1" > "$out/exit.txt"
  note "exit $1 after $(( $(date +%s) - started )) s (outputs in $out)"
  exit "$1"
}

# -- install: unpack the wheels into a private site directory --------------------------------
note "installing ${#all_wheels[@]} wheel(s) from $wheels into $site"
if ! PIP_BREAK_SYSTEM_PACKAGES=1 "$python" -m pip install --no-index --no-deps --no-compile \
    --disable-pip-version-check --target "$site" "${all_wheels[@]}" >> "$env_txt" 2>&1; then
  note "pip could not install the wheels (log above in env.txt)"
  tail -n 20 "$env_txt" >&2
  finish 3
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

# -- preflight: every import the suite needs, and the plugin copy that will run ---------------
if ! "$python" - "$site" >> "$env_txt" 2>&1 <<'PY'
import importlib, sys
site = sys.argv[1]
missing = []
for module, package in [("torch", "torch"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                        ("pynvml", "nvidia-ml-py"), ("junitparser", "junitparser"), ("jinja2", "jinja2"),
                        ("numpy", "numpy"), ("pytest_gpuconform", "pytest-gpuconform")]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a missing package here
        missing.append(f"{package} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing (add their wheels to WHEEL_DIR): " + "; ".join(missing))
import pytest_gpuconform, torch
if not pytest_gpuconform.__file__.startswith(site):
    sys.exit(f"pytest_gpuconform is imported from {pytest_gpuconform.__file__}, not from the wheel in {site}")
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
print(f"pytest_gpuconform from {pytest_gpuconform.__file__}")
PY
then
  note "preflight failed:"
  tail -n 3 "$env_txt" >&2
  finish 3
fi
{ "$python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|pytest|pytest-xdist|nvidia-ml-py|junitparser|jinja2|numpy|pytest-gpuconform) ' || true
  nvidia-smi -L 2>&1 || echo "nvidia-smi not available"
  nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,driver_version,ecc.mode.current,clocks.sm,power.limit \
    --format=csv 2>&1 || true
} >> "$env_txt"
"$python" -m pytest_gpuconform.cli inventory -o "$out/inventory.json" >> "$env_txt" 2>&1 \
  || note "gpuconform inventory failed (see env.txt)"

# -- the run -------------------------------------------------------------------------------
# Deterministic cuBLAS from the first handle on (bitwise checks), NCCL's own warnings kept
# per process, hung collectives ended by the watchdog, leases private to this run.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_DEBUG_FILE="$work/nccl.%h.%p.log"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=3
export GPUCONFORM_LOCK_DIR="$work/leases"
export GPUCONFORM_HOST=${GPUCONFORM_HOST:-$(hostname)}
export PYTHONUNBUFFERED=1
# Still in the empty directory: this also proves the installed suite is found without a checkout.
note "running the suite (limit ${budget} s, --gpuconform-expect-gpus $expect_gpus)"
timeout --kill-after=15 "$budget" "$python" -m pytest --gpuconform -p no:cacheprovider -rfEs --durations=15 \
  --gpuconform-expect-gpus "$expect_gpus" --gpuconform-timeout "$test_timeout" \
  --junitxml="$out/junit.xml" -o junit_logging=system-out "$@" > "$out/pytest.log" 2>&1
rc=$?
tail -n 25 "$out/pytest.log"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  note "pytest was stopped at the ${budget} s limit"
  rc=124
fi
[ "$rc" = 5 ] && { note "no tests ran"; rc=1; }

# NCCL's warnings, one file for all ranks (each process wrote its own)
shopt -s nullglob
nccl_logs=("$work"/nccl.*.log)
shopt -u nullglob
if [ ${#nccl_logs[@]} -gt 0 ] && grep -q . "${nccl_logs[@]}"; then
  for log in "${nccl_logs[@]}"; do
    [ -s "$log" ] && { echo "== $(basename "$log")"; tail -n 50 "$log"; }
  done > "$out/nccl.log"
fi

# -- summary: what the note needs, read from the JUnit file ------------------------------------
"$python" - "$out/junit.xml" "$(( $(date +%s) - started ))" > "$out/summary.txt" 2>&1 <<'PY'
import re, sys
import xml.etree.ElementTree as ET

path, elapsed = sys.argv[1], sys.argv[2]
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as exc:
    sys.exit(f"no JUnit to summarise ({exc}); see pytest.log")
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
cases = [c for s in suites for c in s.iter("testcase")]

def props(case):
    return {p.get("name"): p.get("value") for p in case.iter("property")}

def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None

outcome = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
failures = []
for case in cases:
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    if bad is not None:
        kind = "error" if bad.tag == "error" or bad.get("type") == "error" else "failed"
        outcome[kind] += 1
        failures.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:300]}")
    elif case.find("skipped") is not None:
        outcome["skipped"] += 1
    else:
        outcome["passed"] += 1
suite_time = sum(float(s.get("time") or 0) for s in suites)
print(f"suite: {len(cases)} tests: {outcome['passed']} passed, {outcome['failed']} failed, "
      f"{outcome['error']} errors, {outcome['skipped']} skipped; pytest {suite_time:.0f} s, script {elapsed} s")

print("\nGEMM TFLOP/s per dtype (floor):")
for case in cases:
    if "test_gemm_throughput" not in case.get("name", ""):
        continue
    p = props(case)
    for name, value in sorted(p.items()):
        match = re.fullmatch(r"(gpu\d+)_(\w+?)_tflops", name)
        if match:
            floor = p.get(f"{name}_floor", "none")
            print(f"  {match.group(1)} {match.group(2)}: {number(value):.1f} (floor {floor})")

print("\nCUDA numbers against their bounds (memory ratios, AMP errors, ...):")
for case in cases:
    if "cuda" not in case.get("name", ""):
        continue
    p = props(case)
    pairs = [(n, v, p.get(n + "_bound", p.get(n + "_max"))) for n, v in p.items()]
    shown = [f"{n}={v} (<= {b})" for n, v, b in pairs if b is not None]
    shown += [f"{n}={v}" for n, v in p.items() if n.endswith("_ratio") and n + "_bound" not in p]
    settings = [f"{n}: {p[n]}" for n in ("tf32", "cuda_determinism") if n in p]
    if shown or settings:
        print(f"  {case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}: " + "; ".join(shown + settings))

print(f"\nfailures and errors ({len(failures)}):")
for line in failures:
    print("  " + line)
reasons = {}
for case in cases:
    skipped = case.find("skipped")
    if skipped is not None:
        reason = (skipped.get("message") or "").split(": ", 1)[-1][:160]
        reasons[reason] = reasons.get(reason, 0) + 1
print("\nskip reasons:")
for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:15]:
    print(f"  {count:4d} x {reason}")
PY
cat "$out/summary.txt"
finish "$rc"
