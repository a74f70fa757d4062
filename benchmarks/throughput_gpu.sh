#!/usr/bin/env bash
# Throughput (issue 26) on one GPU lease: benchmarks/throughput.py's full grid with --device cuda (both model
# sets, training and generation, fp32 and bf16, the profile), in about 7 minutes of wall time. Results come
# back from $OUT: throughput.json (every call's seconds), throughput.md, throughput.png, throughput.log.
#
# Prepare once, here, in the repository root (.whl and .data are ignored folders that the device tool carries):
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
#   mkdir -p .data && cp ../shared/data/python-docs.txt .data/      # 1.8 MB, 439k tokens (327,680 are read)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2
#   du -sh .whl .data     # with the tracked files (~29 MiB) under the 64 MiB a call carries
# Run (device tool), with this checkout's `git rev-parse HEAD` pasted in (the copy there has no .git):
#   run(command="GIT_COMMIT=<sha> bash benchmarks/throughput_gpu.sh", carry=[".whl", ".data"], timeout_s=540)
#
# The machine has python 3.12, torch 2.11 (CUDA) and transformers 5.17, no datasets: the wheels go to /tmp/site,
# ahead of the image's packages on PYTHONPATH, with the repository root (the package is not installed there).
# The import check below fails within seconds if a requirement is still missing or too old (transformers checks
# regex, tokenizers, accelerate, ... at import): add that package's wheel to .whl and run again.
#
# Time, measured on an H200 (2026-12-04): the shipped pair's 20 cells and the SmolLM2-config pair's training and
# fp32 generation after 64-token prompts took 4.6 minutes of cells (5.2 with install and start); --max-minutes 4.5
# then left the SmolLM2-config generation after 1,024-token prompts and in bf16 "not run" (a second call ran the
# 1,024-token ones with --repeats 1 in 1.6 minutes). A whole grid needs a second call or a 10-minute lease.
#
# Both sides compiled (issue 41: the token LM's forward with a static cache, the SLLM's static decoder steps,
# Transformers' default CompileConfig, i.e. CUDA graphs): MODES="--peer-compiled --sllm-compiled" bash ...; each
# generate cell's first call compiles (first_call_s), so trim the grid (e.g. --models shipped) to fit the lease.
# Not run yet: no device was lent to issue 41's sessions.
set -euo pipefail
MODES=${MODES:-}
OUT=${OUT:-benchmarks/results/throughput-cuda}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, datasets, peft, modeling_sllm
print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/throughput.py --device cuda --data-dir .data --corpus python-docs \
    --models shipped smollm2-config --phases train generate --train-rows 256 1024 --batch 32 \
    --batches 1 8 64 256 --prompts 64 1024 --new-tokens 128 --dtypes fp32 bf16 --repeats 2 --profile $MODES \
    --max-minutes 4.5 --output-dir "$OUT" 2>&1 | tee "$OUT/throughput.log"
