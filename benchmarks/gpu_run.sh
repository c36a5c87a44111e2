#!/usr/bin/env bash
# One-shot GPU benchmark of fastdpo against naive PyTorch, TRL 1.16, Liger-Kernel 0.8.5 and Cut Cross-Entropy
# (issue #15 item 4), for a bare H100/H200 machine with no network: torch, triton, transformers preinstalled; the
# peers travel as wheels. Finishes within --budget-s (default 390 s; hard stop 15 s later) and writes
# <device>-<YYYYMMDD-HHMMSS>.{json,csv,txt,png} into OUTDIR, rewritten after every case.
#
#   benchmarks/gpu_run.sh OUTDIR [--dry-run] [--wheels DIR] [--budget-s S] [--sections logprobs,head,dpo]
#
# Steps: (1) benchmarks/gpu_install.py installs the wheels of DIR (default .whl at the repository root, filled on a
# machine with registry access by `python benchmarks/wheels.py`) and fastdpo itself into a temporary folder that goes
# first on PYTHONPATH (pip without build isolation, else a copy of the layout pyproject.toml declares; it says which
# worked); (2) python -m fastdpo.benchmarks.gpu_bench runs the sections from a folder outside the checkout, under a
# hard timeout; (3) the CSV, text table and PNG are redrawn from the JSON however step 2 ended, and the table printed.
# A missing peer is reported ("peer X: missing ... -> its cases are SKIPPED") and its cases recorded as skipped.
#
# The one device call (a later session with a GPU; `.whl` is git-ignored, so it must be carried; 480 s leaves
# room for one rerun of a section inside the 15-minute device budget):
#
#   run(command="set -o pipefail; PYTHONUNBUFFERED=1 bash benchmarks/gpu_run.sh \"$OUT\" 2>&1 | tee \"$OUT/gpu_run.log\"",
#       carry=[".whl"], timeout_s=480)
#
# The results come back as 5 files (json, csv, txt, png, log). A rerun of one section on the still-warm machine:
#   bash benchmarks/gpu_run.sh "$OUT" --sections dpo --budget-s 200
#
# --dry-run: CPU, tiny shapes, Triton interpreter (tests/test_gpu_run.py runs it).
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_run.sh OUTDIR [--dry-run] [--wheels DIR] [--budget-s S] [--sections LIST]" >&2; exit 2; }

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
[ $# -ge 1 ] || usage
case "$1" in -*) usage ;; esac
OUTDIR=$1; shift
WHEELS="$REPO/.whl"
BUDGET=390
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
        --budget-s) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
        --dry-run) PASS+=("$1"); shift ;;
        --sections) [ $# -ge 2 ] || usage; PASS+=("$1" "$2"); shift 2 ;;
        *) echo "gpu_run.sh: unknown argument $1" >&2; usage ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_run.sh: --budget-s must be a whole number of seconds, got $BUDGET" >&2; exit 2 ;; esac
[ "$BUDGET" -gt 0 ] || { echo "gpu_run.sh: --budget-s must be positive" >&2; exit 2; }
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
DEADLINE=$((START + BUDGET))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastdpo-gpu-run.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "gpu_run.sh: repo $REPO, out $OUTDIR, wheels $WHEELS, budget ${BUDGET} s, python $($PYTHON --version 2>&1)"

# (1) offline install into $WORK/site
"$PYTHON" "$REPO/benchmarks/gpu_install.py" --repo "$REPO" --site "$WORK/site" --wheels "$WHEELS" \
    --report "$WORK/install.json" || { echo "gpu_run.sh: fastdpo could not be installed (see above)" >&2; exit 1; }
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export FASTDPO_BACKEND=${FASTDPO_BACKEND:-triton}
for a in ${PASS[@]+"${PASS[@]}"}; do [ "$a" = --dry-run ] && export TRITON_INTERPRET=1; done

# (2) the benchmark, from outside the checkout (python -m puts the working folder first on sys.path), hard-stopped
# 15 s after the deadline; every finished case is already on disk
cd "$WORK" || exit 1
LEFT=$((DEADLINE - $(date +%s) + 15))
[ "$LEFT" -gt 5 ] || LEFT=5
timeout --kill-after=10 "$LEFT" "$PYTHON" -m fastdpo.benchmarks.gpu_bench "$OUTDIR" --deadline "$DEADLINE" \
    --install-report "$WORK/install.json" ${PASS[@]+"${PASS[@]}"}
RC=$?
[ $RC -eq 124 ] || [ $RC -eq 137 ] && echo "gpu_run.sh: benchmark stopped at the hard time limit (rc $RC); finished cases are kept"

# (3) redraw CSV / text / PNG from the newest JSON of this run and print the table
JSON=$(find "$OUTDIR" -maxdepth 1 -name '*.json' -newermt "@$START" -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
if [ -n "$JSON" ]; then
    "$PYTHON" -m fastdpo.benchmarks.gpu_report "$JSON" || { [ $RC -ne 0 ] || RC=1; }
else
    echo "gpu_run.sh: no results written" >&2
    [ $RC -ne 0 ] || RC=1
fi
echo "gpu_run.sh: done in $(( $(date +%s) - START )) s, exit $RC"
exit $RC
