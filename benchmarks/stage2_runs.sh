#!/usr/bin/env bash
# Every run behind benchmarks/results/stage2/ and the shipped sentence modules, in order: stage 1 once,
# the small-decoder stage-2 variants two at a time (one CPU thread each, the same CPU-time budget; with an
# odd count the last one runs alone), the backbone-as-decoder variants (learned ends: measured as
# initialised; rule ends: its stop head trained on the backbone's sentence states, 6 CPU-minutes: a step
# through the shared decoder costs ~10x a small decoder's, so minutes would train its context path
# ~nothing), then the measurements (the report alone on the machine: speeds are timed), the perplexities
# on the 512 quality rows, and the shipped modules.
# The variants are benchmarks/variants/stage2.json: each pinned as it was run (every sentence-module field
# of SLLMConfig), stage 1 too. The superseded 40-minute headline run, which ran beside the last small
# variant: benchmarks/history/stage2_headline_runs.sh.
# Checkpoints go to RUNS (outside the repository); each run resumes from its checkpoint when restarted,
# and a trained variant is skipped.
#
#   bash benchmarks/stage2_runs.sh [RUNS=../runs/stage2-study] [MINUTES=12]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-../runs/stage2-study}
MINUTES=${2:-12}
SHARED="backbone as decoder (shared, frozen) + window 32 + 4 prefix vectors"
SHIPPED="backbone as decoder (shared, frozen) + window 32 + rule ends"
mkdir -p "$RUNS"
study() { python benchmarks/stage2_study.py "$@"; }
train() { study train --variant "$1" --runs "$2" --minutes "$3" "${@:4}" > "$2/$(echo "$1" | tr -c 'a-z0-9\n' '-').log" 2>&1; }

two_at_a_time() {  # two_at_a_time MINUTES EVALS VARIANT...: two runs side by side, then the next two; an odd last one alone
    local minutes=$1 evals=$2 failed=0 pids pid
    shift 2
    while (($# > 0)); do
        pids=()
        train "$1" "$RUNS" "$minutes" --evals "$evals" &
        pids+=($!)
        if (($# > 1)); then
            train "$2" "$RUNS" "$minutes" --evals "$evals" &
            pids+=($!)
            shift
        fi
        shift
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done  # both finish before a failure stops the script
        if ((failed)); then
            echo "a training run failed: see its log in $RUNS" >&2
            return 1
        fi
    done
}

[ -f "$RUNS/stage1/modules/sentence_modules.safetensors" ] || study stage1 --runs "$RUNS" --minutes 12 --evals 4
all_variants=$(study list)  # reads (and checks) the variant file; a bad one stops the script here
mapfile -t variants < <(grep -vF "backbone as decoder" <<< "$all_variants")
two_at_a_time "$MINUTES" 3 "${variants[@]}"
train "$SHARED" "$RUNS" 0
train "$SHIPPED" "$RUNS" 6 --evals 2
study report --runs "$RUNS" --repeats 3
study report --runs "$RUNS" --repeats 5 --only "1 layer + rule ends"            # the default's candidates,
study report --runs "$RUNS" --repeats 5 --only "1 layer (the current design)"   # each measured alone
study perplexity --runs "$RUNS" --variant "1 layer + rule ends"
study perplexity --runs "$RUNS" --variant "$SHIPPED"
study ship --runs "$RUNS" --variant "$SHIPPED"
