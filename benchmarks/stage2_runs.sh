#!/usr/bin/env bash
# Every run behind benchmarks/results/stage2/, in order: stage 1 once, then the stage-2 variants two at
# a time (one CPU thread each), then the measurements. Checkpoints go to RUNS (outside the
# repository); each run resumes from its last checkpoint when started again.
#
#   bash benchmarks/stage2_runs.sh [RUNS=../runs/stage2-study] [STAGE1_MINUTES=12] [MINUTES=6]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/stage2-study}
STAGE1_MINUTES=${2:-12}
MINUTES=${3:-6}
mkdir -p "$RUNS"
study() { python benchmarks/stage2_study.py "$@" --runs "$RUNS"; }

[ -f "$RUNS/stage1/modules/sentence_modules.safetensors" ] || study stage1 --minutes "$STAGE1_MINUTES" --evals 4
mapfile -t variants < <(study list)
for ((i = 0; i < ${#variants[@]}; i += 2)); do
    for variant in "${variants[@]:i:2}"; do
        study train --variant "$variant" --minutes "$MINUTES" --evals 3 > "$RUNS/$(echo "$variant" | tr -c 'a-z0-9\n' '-').log" 2>&1 &
    done
    wait
done
study report
