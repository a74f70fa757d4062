#!/usr/bin/env bash
# Issue 27: the best small-decoder recipe of the stage-2 study ("1 layer + rule ends + context norm") with
# units of a few tokens on the frozen SmolLM2: units <= 8 (benchmarks/variants/stage2-units-8.json) and clause
# units (stage2-clause-units.json), each from its own stage 1 with the same units; 12 CPU-minutes of one
# thread each, two side by side, as in stage2_context_norm_runs.sh. Then the report of both (alone on the
# machine: speeds are timed), merged into benchmarks/results/stage2/ beside the sentence-unit rows.
# Checkpoints go to RUNS (outside the repository); a run resumes from its checkpoint, a trained one is skipped.
#
#   bash benchmarks/stage2_units_runs.sh [RUNS=../runs/stage2-units] [MINUTES=12]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/stage2-units}
MINUTES=${2:-12}
UNITS=(units-8 clause-units)
study() { python benchmarks/stage2_study.py "$@"; }
source benchmarks/side_by_side.sh
stage1() { echo "[ -f $RUNS/$1/stage1/modules/sentence_modules.safetensors ] || python benchmarks/stage2_study.py stage1 --variants-file benchmarks/variants/stage2-$1.json --runs $RUNS/$1 --minutes $MINUTES --evals 4 > $RUNS/$1/stage1.log 2>&1"; }
stage2() { echo "python benchmarks/stage2_study.py train --variants-file benchmarks/variants/stage2-$1.json --runs $RUNS/$1 --minutes $MINUTES --evals 3 > $RUNS/$1/train.log 2>&1"; }

for u in "${UNITS[@]}"; do mkdir -p "$RUNS/$u"; done
side_by_side "$(stage1 "${UNITS[0]}")" "$(stage1 "${UNITS[1]}")"
side_by_side "$(stage2 "${UNITS[0]}")" "$(stage2 "${UNITS[1]}")"
for u in "${UNITS[@]}"; do
    file=benchmarks/variants/stage2-$u.json
    study report --variants-file "$file" --runs "$RUNS/$u" --repeats 3 --only "$(study list --variants-file "$file")"
done
