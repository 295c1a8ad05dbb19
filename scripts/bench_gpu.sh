#!/usr/bin/env bash
# `make bench-gpu`: the GPU tests, then every benchmark at its GPU preset, into one directory, each step
# time-boxed so that the whole run fits BUDGET_S seconds (default 480: a device call of 8 minutes).
#
#   scripts/bench_gpu.sh [--dry-run] [DIR]
#
# DIR defaults to $OUT if set, else results/bench-gpu. Each step's output goes to DIR/<step>.log, and the
# benchmarks write their Markdown and JSON tables into DIR. A failed or timed-out step is recorded and the
# run goes on. A step gets its own timeout or what is left of the budget, whichever is less; once under
# MIN_STEP_S (default 10) seconds of the budget are left, the remaining steps are skipped (recorded). The
# summary (step, status, seconds) is printed at the end and written to DIR/summary.md. The exit status is
# 0 only if every step passed.
#
# A step is one line "name|timeout seconds|command"; the command runs under bash in the repository root,
# with $PY (this project's venv python, .venv/bin/python, else python: a GPU machine may have jax installed
# system-wide and no venv) and $DIR (the results directory, absolute) set. STEPS (newline-separated lines of
# that form; blank lines and # comments ignored) replaces the list below. --dry-run prints the plan and runs
# nothing.
set -uo pipefail

# The timeouts sum to the budget: a step added here takes its time from the others (or runs with what
# they leave).
DEFAULT_STEPS=(
  'gpu-tests|75|$PY -m pytest -m gpu tests/pallas_kernels -q -p no:cacheprovider'
  'pallas-kernels-bench|85|$PY -m pallas_kernels.bench --out "$DIR/pallas_kernels"'
  'model-bench|50|$PY -m serve.bench_model --preset llava-1.5-7b --dtype bfloat16 --prompt-len 640 --new-tokens 33 --out "$DIR"'
  'qwen-model-bench|40|$PY -m serve.bench_model --preset qwen2.5-vl-7b --dtype bfloat16 --prompt-len 640 --new-tokens 33 --out "$DIR/qwen2.5-vl-7b"'
  'adapters-bench|90|$PY -m serve.bench_adapters --preset llava-1.5-7b --dtype bfloat16 --rank 16 --adapters 1 4 16 --batch 16 --prompt-len 640 --new-tokens 9 --prefill-len 128 --out "$DIR"'
  'train-bench|45|$PY -m train.bench --preset llava-1.5-7b --dtype bfloat16 --batch-size 4 --text-tokens 448 --out "$DIR/train_bench.json" > "$DIR/train_bench.md"'
  'train-memory-bench|50|$PY -m train.bench_memory --preset llava-1.5-7b --text-layers 2 --vision-layers 2 --seq 64 --json "$DIR/bench_memory.json" > "$DIR/bench_memory.md"'
  'engine-bench|45|$PY -m serve.bench_engine --preset llava-1.5-7b --dtype bfloat16 --text-layers 4 --out "$DIR"'
)
BUDGET_S=${BUDGET_S:-480}
MIN_STEP_S=${MIN_STEP_S:-10}

usage() { echo "usage: scripts/bench_gpu.sh [--dry-run] [DIR]  (DIR default: \$OUT, else results/bench-gpu)" >&2; exit 2; }

dry_run=0
dir=
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    -*) echo "bench_gpu: unknown option $arg" >&2; usage ;;
    *) [[ -z $dir ]] || { echo "bench_gpu: one directory only, got '$dir' and '$arg'" >&2; usage; }; dir=$arg ;;
  esac
done
dir=${dir:-${OUT:-results/bench-gpu}}
[[ $BUDGET_S =~ ^[0-9]+$ && $MIN_STEP_S =~ ^[0-9]+$ ]] || { echo "bench_gpu: BUDGET_S and MIN_STEP_S must be whole seconds" >&2; exit 2; }

if [[ -n ${STEPS:-} ]]; then
  mapfile -t lines <<< "$STEPS"
else
  lines=("${DEFAULT_STEPS[@]}")
fi
names=() timeouts=() commands=()
for line in "${lines[@]}"; do
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  IFS='|' read -r name seconds command <<< "$line"  # the command keeps any further '|'
  if [[ ! $name =~ ^[A-Za-z0-9._-]+$ || ! $seconds =~ ^[1-9][0-9]*$ || -z ${command// } ]]; then
    echo "bench_gpu: a step must be 'name|timeout seconds|command' (name of letters, digits, . _ -), got: $line" >&2
    exit 2
  fi
  names+=("$name") timeouts+=("$seconds") commands+=("$command")
done
(( ${#names[@]} )) || { echo "bench_gpu: no steps" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x $root/.venv/bin/python ]]; then PY=$root/.venv/bin/python; else PY=python; fi

if (( dry_run )); then
  echo "bench_gpu (dry run): ${#names[@]} steps into $dir with $PY, budget $BUDGET_S s"
  for i in "${!names[@]}"; do
    printf '%s. %s (timeout %s s): %s\n' "$((i + 1))" "${names[i]}" "${timeouts[i]}" "${commands[i]}"
  done
  exit 0
fi

mkdir -p "$dir" || exit 2
DIR=$(cd "$dir" && pwd)
export PY DIR
cd "$root" || exit 2

now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }  # EPOCHREALTIME: bash 5
elapsed() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
header="bench-gpu at commit $commit on ${device:-no nvidia-smi device}, interpreter $PY, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "$header: ${#names[@]} steps into $DIR, budget $BUDGET_S s"
statuses=() durations=()
failed=0
run_start=$(now)
for i in "${!names[@]}"; do
  name=${names[i]} log="$DIR/${names[i]}.log"
  left=$(awk -v budget="$BUDGET_S" -v used="$(elapsed "$run_start")" 'BEGIN { printf "%d", budget - used }')
  limit=$(( timeouts[i] < left ? timeouts[i] : left ))
  if (( left < MIN_STEP_S )); then
    statuses+=("skipped (${left} s of the budget left)") durations+=(0.0) failed=1
    echo "[$((i + 1))/${#names[@]}] $name: skipped, ${left} s of the budget left"
    continue
  fi
  echo "[$((i + 1))/${#names[@]}] $name (timeout $limit s): ${commands[i]}"
  start=$(now)
  timeout --kill-after=10 "$limit" bash -c "${commands[i]}" > "$log" 2>&1
  rc=$?
  durations+=("$(elapsed "$start")")
  case $rc in
    0) statuses+=(ok) ;;
    124|137) statuses+=("timed out after $limit s") failed=1 ;;
    *) statuses+=("failed (exit $rc)") failed=1 ;;
  esac
  echo "    ${statuses[-1]} in ${durations[-1]} s, log $log"
  if (( rc )); then tail -n 15 "$log" | sed 's/^/    | /'; fi
done

{
  echo "$header"
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | --- |"
  for i in "${!names[@]}"; do echo "| ${names[i]} | ${statuses[i]} | ${durations[i]} |"; done
} > "$DIR/summary.md"
echo
cat "$DIR/summary.md"
exit "$failed"
