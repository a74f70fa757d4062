#!/usr/bin/env bash
# History (superseded): the stage-2 headline run of 2026-11-29 behind benchmarks/history/results/stage2-headline/:
# "1 layer (the current design)" as it was then (learned sentence ends) for 40 CPU-minutes with the
# log-Q-corrected sampled softmax, pinned in benchmarks/history/variants/stage2-headline.json, from the
# stage-2 study's stage 1 (made here if RUNS has none). As run it trained beside the last small-decoder
# variant of benchmarks/stage2_runs.sh (commit d3d601e); it reached 19.2x the backbone's perplexity on the
# 512 quality rows and was not shipped. Superseded by the rule-end variants and the shipped
# backbone-as-decoder modules (benchmarks/results/stage2/).
#
#   bash benchmarks/history/stage2_headline_runs.sh [RUNS=../runs/stage2-study] [MINUTES=40]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-../runs/stage2-study}
MINUTES=${2:-40}
HEADLINE="1 layer (the current design)"
study() { python benchmarks/stage2_study.py "$@" --variants-file benchmarks/history/variants/stage2-headline.json; }

mkdir -p "$RUNS/headline"
[ -f "$RUNS/stage1/modules/sentence_modules.safetensors" ] || study stage1 --runs "$RUNS" --minutes 12 --evals 4
ln -sfn ../stage1 "$RUNS/headline/stage1"
study train --variant "$HEADLINE" --runs "$RUNS/headline" --minutes "$MINUTES" --evals 8 \
    > "$RUNS/headline/$(echo "$HEADLINE" | tr -c 'a-z0-9\n' '-').log" 2>&1
study report --runs "$RUNS/headline" --repeats 3 --quality-rows --output-dir benchmarks/history/results/stage2-headline
