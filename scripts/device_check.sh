#!/usr/bin/env bash
# Issue 13's GPU check, one command, one JSON report, under 8 minutes on one GPU:
#
#   scripts/device_check.sh [REPORT.json]        # default: $OUT/device_check.json, else ./device_check.json
#   DRY_RUN=1 scripts/device_check.sh            # on a CPU: every section on tiny models (tests the script)
#
# Sections, each in its own subshell with `set -e` and its own time limit; a failed or timed-out section is
# recorded (rc, seconds, log tail) and the next one runs:
#   env        GPU, driver, torch / triton / transformers versions
#   kernels    tests/test_kernels.py + tests/test_received_attention.py on the GPU (Triton compiled, not
#              interpreted)
#   gpu_check  CUDA generate() == CPU generate(), every registered family x method (scripts/gpu_check.py)
#   syncs      generate()'s decoding step on CUDA: no host sync (sync debug mode "error"), no graph break
#   bandwidth  the Triton gathers' achieved GB/s as a share of the device's peak; received-attention kernel
#   bench_*    7B-shaped random LLaVA-1.5 and Qwen2-VL, bf16, batch 1 and 8: prefill realised vs FLOPs-ideal
#              speed-up (eager, then decoder layers compiled), decode ms/token (eager, then generate()'s
#              compiled decoding); each family within its own budget, JSON written after every step
# The report ends with the issue's targets: realised >= 0.8 x ideal at batch 1 compiled, >= 0.9 at batch 8,
# gathers >= 80% of peak bandwidth.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

REPORT="${1:-${OUT:-.}/device_check.json}"
DRY="${DRY_RUN:-0}"
WORK="$(mktemp -d)"
SECTIONS=()
START=$(date +%s)
PY="${PYTHON:-python}"

if [[ "$DRY" == 1 ]]; then
  DRY_FLAG=(--dry-run)
  export TRITON_INTERPRET=1
else
  DRY_FLAG=()
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "device_check: no nvidia-smi; on a CPU run DRY_RUN=1 $0" >&2
  fi
fi

# section NAME LIMIT_SECONDS RESULT_JSON_OR_- COMMAND...
section() {
  local name=$1 limit=$2 result=$3
  shift 3
  local log="$WORK/$name.log" t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s, $(( t0 - START ))s elapsed)"
  ( set -e; timeout --kill-after=15 "$limit" "$@" ) >"$log" 2>&1
  rc=$?
  tail -n 5 "$log" | sed "s/^/   $name: /"
  "$PY" - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$log" "$result" "$WORK/$name.section.json" <<'EOF'
import json, sys
from pathlib import Path
name, rc, seconds, limit, log, result, out = sys.argv[1:]
rc = int(rc)
data = {"section": name, "rc": rc, "seconds": int(seconds), "limit_s": int(limit),
        "timed_out": rc in (124, 137), "log_tail": Path(log).read_text(errors="replace")[-4000:]}
if result != "-" and Path(result).is_file():
    try:
        data["result"] = json.loads(Path(result).read_text())
    except ValueError as e:
        data["result_error"] = str(e)
Path(out).write_text(json.dumps(data))
EOF
  SECTIONS+=("$WORK/$name.section.json")
}

section env 30 "$WORK/env.json" "$PY" -c "
import json, platform, subprocess, torch, transformers
info = {'python': platform.python_version(), 'torch': torch.__version__, 'transformers': transformers.__version__,
        'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton; info['triton'] = triton.__version__
except ImportError:
    info['triton'] = None
try:
    info['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm',
        '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    info['nvidia_smi'] = repr(e)
json.dump(info, open('$WORK/env.json', 'w')); print(info)"

section kernels 100 - "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_received_attention.py

section gpu_check 100 "$WORK/gpu_check.json" "$PY" scripts/gpu_check.py --json "$WORK/gpu_check.json" "${DRY_FLAG[@]}"

section syncs 45 "$WORK/syncs.json" "$PY" scripts/device_check.py syncs "$WORK/syncs.json" "${DRY_FLAG[@]}"

section bandwidth 40 "$WORK/bandwidth.json" "$PY" scripts/device_check.py bandwidth "$WORK/bandwidth.json" "${DRY_FLAG[@]}"

# Each family gets a budget inside (steps that would not fit are skipped and listed) and a hard limit above it.
for family in llava qwen2_vl; do
  section "bench_$family" 130 "$WORK/bench_$family.json" \
    "$PY" scripts/device_check.py bench "$family" "$WORK/bench_$family.json" --deadline 105 "${DRY_FLAG[@]}"
done

mkdir -p "$(dirname "$REPORT")"
"$PY" scripts/device_check.py merge "$REPORT" "${SECTIONS[@]}"
echo "device_check: wrote $REPORT in $(( $(date +%s) - START ))s (section logs in $WORK)"
