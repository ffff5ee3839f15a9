#!/usr/bin/env bash
# A GPU machine's worth of evidence: core tests on the machine's JAX, then step time, throughput and
# peak memory of LoRA through `lora_jax.wrap` against full fine-tuning, hand-written LoRA and PEFT, on
# the 853M-parameter decoder (batch 8 x 1024 tokens, bf16), each run in its own process.
#
# For an NVIDIA H100/H200 machine that already has JAX (CUDA), torch, transformers and PEFT and no
# internet; run from anywhere, it works in the repository root. About 7 minutes; the whole suite keeps
# to SUITE_BUDGET_S seconds (default 450) by skipping whatever would start too late, least important last.
#
#   bash benchmarks/device_suite.sh              # results under $OUT, or ./device_out if OUT is unset
#   SMOKE=1 bash benchmarks/device_suite.sh      # dry run on CPU with the tiny model, ~2 minutes
#
# Writes: results.jsonl (one JSON line per run, failures too), results.json (the same as a list),
# table.md (markdown summary), suite.log (everything printed), pytest.log, versions.json.
# Knobs: PYTHON (default python3), SUITE_BUDGET_S, RUN_TIMEOUT_S, TESTS=0 (skip the core tests),
# TEST_PLATFORM (cpu, the default: tests run on CPU beside the measurements; anything else runs them
# first, on the default backend), INSTALL=0 (skip the pip install).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
LOG=$OUT/suite.log
RESULTS=$OUT/results.jsonl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
: >"$RESULTS"
START=$(date +%s)

# The scripts import lora_jax from the checkout even when the editable install below fails.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

if [[ $SMOKE == 1 ]]; then
    export JAX_PLATFORMS=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} # torch's spinning threads crawl on a shared CPU
    SUITE_BUDGET_S=${SUITE_BUDGET_S:-300}
    RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-120}
    MIN_START_S=5
    INSTALL=${INSTALL:-0}
    LLAMA=(--model tiny --batch 2 --seq 32 --steps 2 --warmup 1 --chunk 16)
    PLAIN=(--size tiny --steps 2 --warmup 1)
    TORCH=(--model tiny --batch 2 --seq 32 --steps 2 --warmup 1)
else
    SUITE_BUDGET_S=${SUITE_BUDGET_S:-450}
    RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}
    MIN_START_S=45 # an 853M compile alone takes 30-60 s
    INSTALL=${INSTALL:-1}
    LLAMA=(--model 853m --batch 8 --seq 1024 --steps 10 --warmup 3 --chunk 1024)
    PLAIN=(--size 853m --steps 10 --warmup 3)
    TORCH=(--model 853m --batch 8 --seq 1024 --steps 10 --warmup 3)
fi
TESTS=${TESTS:-1}
TEST_PLATFORM=${TEST_PLATFORM:-cpu}

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[$(date +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$LOG"; }

# Appends one record to results.jsonl: the run's JSON line with `run`, `status`, `wall_s`, `note` and
# `command` added, or, without a JSON line, a failure record carrying the end of its stderr.
record() { # name status rc wall_s stdout_file stderr_file command
    "$PY" - "$@" >>"$RESULTS" <<'EOF'
import json, os, re, sys
name, status, rc, wall, out, err, command = sys.argv[1:8]
line = None
for text in open(out, errors="replace").read().splitlines():
    if text.startswith("{"):
        line = text
record = {}
if line is not None and status == "ok":
    try:
        record = json.loads(line)
    except ValueError:
        status = "failed"
if status != "ok" or not record:
    lines = [t.strip() for t in open(err, errors="replace").read().splitlines() if t.strip()]
    # The exception line says most ("RuntimeError: cuDNN is not detected."); else the last lines.
    errors = [t for t in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", t)]
    record = {"error": (errors[-1] if errors else " / ".join(lines[-3:]))[-400:] or "no output"}
    status = "failed" if status == "ok" else status
    if status != "skipped" and "--attention cudnn" in command:
        name += " [cudnn]"  # the fallback to xla, if any, takes the plain name
record.update(run=name, status=status, rc=int(rc), wall_s=float(wall), command=command)
if os.environ.get("RUN_NOTE"):
    record["note"] = os.environ["RUN_NOTE"]
print(json.dumps(record))
EOF
}

# measure NAME CMD...: runs CMD with a timeout (RUN_LIMIT, else RUN_TIMEOUT_S, at most what is left of
# the budget) in its own process; returns 0 (measured), 1 (failed), 2 (skipped: too little budget left).
measure() {
    local name=$1
    shift
    local remaining=$((SUITE_BUDGET_S - $(elapsed)))
    local out=$WORK/run.out err=$WORK/run.err
    : >"$out"
    if ((remaining < MIN_START_S)); then
        log "SKIP $name: ${remaining}s of the budget left"
        echo "skipped: ${remaining}s of the suite budget left" >"$err"
        record "$name" skipped 0 0 "$out" "$err" "$*"
        return 2
    fi
    local cap=${RUN_LIMIT:-$RUN_TIMEOUT_S}
    local limit=$((remaining < cap ? remaining : cap))
    log "RUN $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$err"
    rc=$?
    local wall=$(($(date +%s) - t0))
    cat "$out" >>"$LOG"
    grep -v -e '^\s*$' "$err" | tail -n 20 | sed 's/^/    stderr: /' >>"$LOG"
    if ((rc == 0)) && grep -q '^{' "$out"; then
        record "$name" ok "$rc" "$wall" "$out" "$err" "$*"
        log "OK $name in ${wall}s: $(grep '^{' "$out" | tail -n 1 | cut -c1-160)"
        return 0
    fi
    local status=failed
    ((rc == 124 || rc == 137)) && status=timeout
    record "$name" "$status" "$rc" "$wall" "$out" "$err" "$*"
    log "FAILED $name ($status, rc $rc) in ${wall}s: $(grep -v -e '^\s*$' "$err" | tail -n 1 | cut -c1-200)"
    return 1
}

# The project's Llama with the fused attention kernel; if cudnn fails once, every later run uses xla.
ATTN=cudnn
llama() { # name mode args...
    local name=$1 mode=$2
    shift 2
    local attention=(--attention "$ATTN")
    [[ " $* " == *" --attention "* ]] && attention=()
    measure "$name" "$PY" benchmarks/llama_step.py "$mode" "${LLAMA[@]}" ${attention[@]+"${attention[@]}"} "$@"
    local rc=$?
    if ((rc == 1)) && [[ ${#attention[@]} -gt 0 && $ATTN == cudnn ]]; then
        log "cudnn attention failed in '$name': falling back to attention xla for it and the runs after"
        ATTN=xla
        RUN_NOTE="attention xla: cudnn failed" measure "$name" "$PY" benchmarks/llama_step.py "$mode" \
            "${LLAMA[@]}" --attention xla "$@"
        rc=$?
    fi
    return $rc
}

log "device suite: SMOKE=$SMOKE budget ${SUITE_BUDGET_S}s, run timeout ${RUN_TIMEOUT_S}s, out $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1

# --- install the project on top of the machine's packages (never touching its JAX or torch) ---
if [[ $INSTALL == 1 ]]; then
    log "pip install --no-deps -e ."
    if timeout 90 "$PY" -m pip install --no-deps --no-input --retries 0 --timeout 5 -e . >>"$LOG" 2>&1; then
        log "installed"
    elif timeout 60 "$PY" -m pip install --no-deps --no-input --no-build-isolation -e . >>"$LOG" 2>&1; then
        log "installed (without build isolation)"
    else
        log "NOTE: pip install failed (no network for the build backend?); using PYTHONPATH=$ROOT instead"
    fi
fi

"$PY" - "$OUT/versions.json" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, json, platform, subprocess, sys
versions = {"python": platform.python_version()}
for name in ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "numpy", "torch",
             "transformers", "peft", "lora_jax"]:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
try:
    versions["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:
    versions["gpu"] = None
json.dump(versions, open(sys.argv[1], "w"), indent=1)
print("versions:", json.dumps(versions))
EOF

# --- core tests on the machine's JAX ---
TEST_FILES=(tests/test_core.py tests/test_rules.py tests/test_primitives.py tests/test_api.py)
TEST_PID=
: >"$OUT/pytest.log"
run_tests() {
    local missing=0 f
    for f in "${TEST_FILES[@]}"; do
        [[ -f $f ]] || { echo "missing test file $f"; missing=1; }
    done
    ((missing)) && return 1
    local extra=()
    # A dry run only collects: the real run would compete with the measurements for a small CPU.
    [[ $SMOKE == 1 ]] && extra=(--collect-only)
    "$PY" -c "import xdist" 2>/dev/null && [[ $SMOKE != 1 ]] && extra+=(-n 4)
    timeout 240 "$PY" -m pytest -x -q "${TEST_FILES[@]}" -p no:cacheprovider ${extra[@]+"${extra[@]}"}
}
if [[ $TESTS == 1 ]]; then
    if [[ $TEST_PLATFORM == cpu ]]; then
        # On the CPU, beside the GPU measurements: they share no device, and the suite's time stays short.
        log "core tests start on CPU in the background -> pytest.log"
        (JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= run_tests >"$OUT/pytest.log" 2>&1; echo "exit $?" >>"$OUT/pytest.log") &
        TEST_PID=$!
    else
        log "core tests on the default backend -> pytest.log"
        run_tests >"$OUT/pytest.log" 2>&1
        echo "exit $?" >>"$OUT/pytest.log"
        log "core tests: $(grep -v '^exit' "$OUT/pytest.log" | grep -v -e '^\s*$' | tail -n 1) ($(tail -n 1 "$OUT/pytest.log"))"
    fi
fi
wait_tests() {
    [[ -n $TEST_PID ]] || return 0
    wait "$TEST_PID"
    TEST_PID=
    log "core tests: $(grep -v '^exit' "$OUT/pytest.log" | grep -v -e '^\s*$' | tail -n 1) ($(tail -n 1 "$OUT/pytest.log"))"
}

# --- measurements, most important first ---
llama "full" full --remat-policy none
llama "wrap" wrap --remat-policy none
wait_tests # torch's eager launches want a quiet CPU
if [[ $SMOKE == 1 ]]; then
    log "SKIP peft+compile: torch.compile is a GPU measurement"
    echo "skipped in SMOKE mode" >"$WORK/skip.err"
    : >"$WORK/skip.out"
    record "peft+compile" skipped 0 0 "$WORK/skip.out" "$WORK/skip.err" "peft_step.py peft --compile"
else
    # torch.compile of the 853M model, forward and backward, takes a minute or two on its own.
    RUN_LIMIT=${COMPILE_TIMEOUT_S:-240} measure "peft+compile" "$PY" benchmarks/peft_step.py peft --compile "${TORCH[@]}"
fi
measure "plain hand" "$PY" benchmarks/step_time.py hand "${PLAIN[@]}"
measure "plain full" "$PY" benchmarks/step_time.py full "${PLAIN[@]}"
llama "wrap plain" wrap --attention einsum --remat-policy none --chunk none
measure "peft" "$PY" benchmarks/peft_step.py peft "${TORCH[@]}"
llama "wrap dots" wrap --remat-policy dots

# --- results ---
wait_tests
"$PY" - "$RESULTS" "$OUT/results.json" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
json.dump(records, open(sys.argv[2], "w"), indent=1)
EOF
{
    "$PY" - "$OUT/versions.json" "$RESULTS" "$SMOKE" <<'EOF'
import datetime, json, sys
versions = json.load(open(sys.argv[1]))
records = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
chip = versions.get("gpu") or next((r["device"] for r in records if r.get("device")), "unknown")
print(f"# Step benchmarks{' (SMOKE: tiny model on CPU)' if sys.argv[3] == '1' else ''}\n")
print(f"- chip: {chip}")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
print("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gpu"))
sizes = {(r["model"], r["batch"], r["seq"]) for r in records if r.get("status") == "ok" and "batch" in r}
print("- shapes (model, batch, seq): " + "; ".join(str(s) for s in sorted(sizes, key=str)))
print()
EOF
    "$PY" benchmarks/llama_step.py --table "$RESULTS"
    echo
    echo "Runs: \`full\`, \`wrap\`: the project's Llama (layers scanned) with the levers in the notes;"
    echo "\`wrap plain\`: the same LoRA on the plain path (einsum attention, whole-batch float32 logits);"
    echo "\`plain hand\` / \`plain full\`: benchmarks/step_time.py's plain-JAX decoder (the ANCHORS reference);"
    echo "\`peft\`, \`peft+compile\`: transformers + PEFT. \`÷ full\` divides by the \`full\` row's step time,"
    echo "\`÷ plain full\` by the \`plain full\` row's."
    if [[ $TESTS == 1 ]]; then
        echo
        echo "Core tests ($TEST_PLATFORM): $(grep -v '^exit' "$OUT/pytest.log" | grep -v -e '^\s*$' | tail -n 1) ($(tail -n 1 "$OUT/pytest.log"))"
    fi
} >"$OUT/table.md" 2>>"$LOG"
cat "$OUT/table.md" | tee -a "$LOG"
n_ok=$(grep -c '"status": "ok"' "$RESULTS")
n_all=$(wc -l <"$RESULTS")
log "done: $n_ok of $n_all runs measured; results in $OUT"
