#!/usr/bin/env bash
# Every run behind benchmarks/results/stage2/ and the shipped sentence modules, in order: stage 1 once,
# the small-decoder stage-2 variants two at a time (one CPU thread each, the same CPU-time budget), the
# backbone-as-decoder variants (learned ends: measured as initialised; rule ends: its stop head trained
# on the backbone's sentence states, 6 CPU-minutes: a step through the shared decoder costs ~10x a small
# decoder's, so minutes would train its context path ~nothing), the 40-minute headline run of the
# learned-end design, then the measurements (the report alone on the machine: speeds are timed), the
# perplexities on the 512 quality rows, and the shipped modules.
# Checkpoints go to RUNS (outside the repository); each run resumes from its checkpoint when restarted.
#
#   bash benchmarks/stage2_runs.sh [RUNS=../runs/stage2-study] [MINUTES=12] [HEADLINE_MINUTES=40]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/stage2-study}
MINUTES=${2:-12}
HEADLINE_MINUTES=${3:-40}
HEADLINE="1 layer (the current design)"
SHARED="backbone as decoder (shared, frozen) + window 32 + 4 prefix vectors"
SHIPPED="backbone as decoder (shared, frozen) + window 32 + rule ends"
mkdir -p "$RUNS"
study() { python benchmarks/stage2_study.py "$@"; }
train() { study train --variant "$1" --runs "$2" --minutes "$3" "${@:4}" > "$2/$(echo "$1" | tr -c 'a-z0-9\n' '-').log" 2>&1; }

[ -f "$RUNS/stage1/modules/sentence_modules.safetensors" ] || study stage1 --runs "$RUNS" --minutes 12 --evals 4
mapfile -t variants < <(study list | grep -vF "backbone as decoder")
for ((i = 0; i < ${#variants[@]} - 1; i += 2)); do
    train "${variants[i]}" "$RUNS" "$MINUTES" --evals 3 &
    train "${variants[i + 1]}" "$RUNS" "$MINUTES" --evals 3 &
    wait
done
mkdir -p "$RUNS/headline"
ln -sfn ../stage1 "$RUNS/headline/stage1"
train "${variants[-1]}" "$RUNS" "$MINUTES" --evals 3 &
train "$HEADLINE" "$RUNS/headline" "$HEADLINE_MINUTES" --evals 8 --training-vocab sampled &
wait
train "$SHARED" "$RUNS" 0
train "$SHIPPED" "$RUNS" 6 --evals 2
study report --runs "$RUNS" --repeats 3
study report --runs "$RUNS" --repeats 5 --only "1 layer + rule ends"            # the default's candidates,
study report --runs "$RUNS" --repeats 5 --only "1 layer (the current design)"   # each measured alone
study report --runs "$RUNS/headline" --repeats 3 --quality-rows --output-dir benchmarks/results/stage2/headline
study perplexity --runs "$RUNS" --variant "1 layer + rule ends"
study perplexity --runs "$RUNS" --variant "$SHIPPED"
study ship --runs "$RUNS" --variant "$SHIPPED"
