#!/usr/bin/env bash
# The stage-2 study's small-decoder variants rerun with the context-scale fix (issue 21), two at a time
# (one CPU thread each, 12 CPU-minutes, as in stage2_runs.sh): benchmarks/variants/stage2-context-norm.json
# (each small variant of stage2.json with decoder_context_norm true, from a stage 1 with the same change)
# and, as controls that the earlier table still holds at this commit, two of stage2.json's originals from a
# retrained original stage 1. Then the report of both (alone on the machine: speeds are timed), merged into
# benchmarks/results/stage2/ (the other variants keep their entries).
# Checkpoints go to RUNS (outside the repository); a run resumes from its checkpoint, a trained one is skipped.
#
#   bash benchmarks/stage2_context_norm_runs.sh [RUNS=../runs/stage2-context-norm] [MINUTES=12]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/stage2-context-norm}
MINUTES=${2:-12}
FIXED=benchmarks/variants/stage2-context-norm.json
CONTROLS=("1 layer + rule ends" "1 layer (the current design)")
mkdir -p "$RUNS/fixed" "$RUNS/control"
study() { python benchmarks/stage2_study.py "$@"; }
log() { echo "$RUNS/$1/$(echo "$2" | tr -c 'a-z0-9\n' '-').log"; }
source benchmarks/side_by_side.sh
fixed_train() { echo "python benchmarks/stage2_study.py train --variants-file $FIXED --runs $RUNS/fixed --minutes $MINUTES --evals 3 --variant '$1' > '$(log fixed "$1")' 2>&1"; }
control_train() { echo "python benchmarks/stage2_study.py train --runs $RUNS/control --minutes $MINUTES --evals 3 --variant '$1' > '$(log control "$1")' 2>&1"; }

side_by_side \
    "[ -f $RUNS/fixed/stage1/modules/sentence_modules.safetensors ] || python benchmarks/stage2_study.py stage1 --variants-file $FIXED --runs $RUNS/fixed --minutes 12 --evals 4 > $RUNS/fixed/stage1.log 2>&1" \
    "[ -f $RUNS/control/stage1/modules/sentence_modules.safetensors ] || python benchmarks/stage2_study.py stage1 --runs $RUNS/control --minutes 12 --evals 4 > $RUNS/control/stage1.log 2>&1"
mapfile -t fixed < <(study list --variants-file "$FIXED")
jobs=()
for v in "${fixed[@]}"; do jobs+=("$(fixed_train "$v")"); done
for v in "${CONTROLS[@]}"; do jobs+=("$(control_train "$v")"); done
for ((i = 0; i < ${#jobs[@]}; i += 2)); do side_by_side "${jobs[i]}" "${jobs[i + 1]:-true}"; done
only=()
for v in "${fixed[@]}"; do only+=(--only "$v"); done
study report --variants-file "$FIXED" --runs "$RUNS/fixed" --repeats 3 "${only[@]}"
study report --runs "$RUNS/control" --repeats 3 --only "${CONTROLS[0]}" --only "${CONTROLS[1]}"
