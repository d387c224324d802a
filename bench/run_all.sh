#!/usr/bin/env bash
# Run the benchmark suites on a CUDA machine, write results, the report and plots, print the short table last.
#
#   bash bench/run_all.sh [--quick] [--suite NAME]... [--compare BASELINE.json] [--fail median:10%] [-- PYTEST_ARGS...]
#
#   --quick          short plan of every suite (same as GEMMA4_FAST_BENCH_QUICK=1)
#   --suite NAME     only bench/bench_NAME.py (repeatable; default: all of bench/)
#   --compare FILE   compare against a saved pytest-benchmark JSON (e.g. the committed
#                    bench/results/<gpu>/pytest-benchmark.json) and fail on regressions
#   --fail EXPR      regression threshold for --compare (default median:10%)
#   -- ARGS          passed to pytest as they are (e.g. -- -k "E2B and not S32768")
#
# Output: $OUT (default: a new temporary folder) gets three files: run.log (everything printed), REPORT.md
# and bench-results.tgz (the results folder: <suite>.json, pytest-benchmark.json, REPORT.md, HEADLINE.md,
# PNGs). The results folder itself is $GEMMA4_FAST_RESULTS (default: a new temporary folder; set it to
# bench/results/<gpu-slug> to write there directly). To keep a run, unpack the archive into
# bench/results/<gpu-slug>/ and rerun `python bench/report.py --gpu <gpu-slug>`.
# Exit status: pytest's (non-zero on a failed item or, with --compare, a regression).
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0
compare=""
fail="median:10%"
suites=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --suite) shift; suites+=("bench/bench_${1}.py") ;;
    --compare) shift; compare="$1" ;;
    --fail) shift; fail="$1" ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$(mktemp -d -t gemma4-fast-bench.XXXXXX)}"
mkdir -p "$OUT"
export GEMMA4_FAST_RESULTS="${GEMMA4_FAST_RESULTS:-$(mktemp -d -t gemma4-fast-results.XXXXXX)}"
mkdir -p "$GEMMA4_FAST_RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
[ "$quick" = 1 ] && export GEMMA4_FAST_BENCH_QUICK=1
LOG="$OUT/run.log"

args=(-q --benchmark-only --benchmark-json="$GEMMA4_FAST_RESULTS/pytest-benchmark.json")
[ -n "$compare" ] && args+=(--benchmark-compare="$compare" --benchmark-compare-fail="$fail")
[ ${#suites[@]} -eq 0 ] && suites=(bench/)

{
  echo "== gemma4-fast bench: $(date -u +%FT%TZ), commit ${GEMMA4_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "== quick=$quick suites=${suites[*]} results=$GEMMA4_FAST_RESULTS"
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>/dev/null
  start=$(date +%s)
  python -m pytest "${suites[@]}" "${args[@]}" "${extra[@]}"
  echo "pytest exit status: $? after $(( $(date +%s) - start )) s"
} 2>&1 | tee "$LOG"
rc=$(grep -o 'pytest exit status: [0-9]*' "$LOG" | tail -1 | grep -o '[0-9]*$')
rc=${rc:-1}

short=$(python bench/report.py --results "$GEMMA4_FAST_RESULTS" --print 2>>"$LOG") || echo "report.py failed (see $LOG)"
echo "$short" >>"$LOG"
cp "$GEMMA4_FAST_RESULTS/REPORT.md" "$OUT/REPORT.md" 2>/dev/null
tar -czf "$OUT/bench-results.tgz" -C "$GEMMA4_FAST_RESULTS" . 2>>"$LOG"
echo "logs: $LOG; results: $GEMMA4_FAST_RESULTS (archive $OUT/bench-results.tgz); pytest exit status $rc"
echo "$short" | tail -n +2
exit "$rc"
