r"""Throughput of an SLLM against its token-level peer (issue 26): training and
generation tokens/s, their ratio, and beside it the ratio the multiply-adds allow; CPU or GPU.

    python benchmarks/throughput.py --threads 2 --train-rows 256 1024 --batches 1 64 --prompts 64 1024 \
        --dtypes fp32 --repeats 3 --profile \
        --skip 'smollm2-config/generate/*/64x1024' 'smollm2-config/train/*/8x1024'
                                                 # CPU: ~16 minutes on 2 idle threads (docs/throughput.md)
    bash benchmarks/throughput_gpu.sh            # the full grid on one GPU lease (--device cuda, ~7 minutes)
    python benchmarks/throughput.py --threads 1 --models shipped --train-rows 32 --batch 2 --batches 2 \
        --prompts 32 --new-tokens 8 --dtypes fp32 --repeats 1 --profile --output-dir /tmp/throughput   # smoke

Models (--models), a pair each: an SLLM and a plain Llama.
- `shipped`: the trained from-scratch equal-perplexity pair in checkpoints/ (scratch-sllm-192x5-decoder-1-layer,
  loaded with SLLMForCausalLM.from_pretrained from the package, and scratch-token-lm-256x5 with
  LlamaForCausalLM), fp32.
- `smollm2-config`: both randomly initialised (seed 0) at SmolLM2-135M's size (`SMOLLM2_LLAMA`: hidden 576,
  30 layers, 9 heads, 3 kv heads, intermediate 1536, tied embeddings, rope theta 100000), the SLLM with the
  shipped SLLM's sentence-module settings (every PINNED_FIELDS value: 1 encoder layer, 1 decoder layer, rule
  sentence ends, ...; sentence_init random) and its boundary token ids. Its vocabulary is 49,152 (SmolLM2's)
  while the texts are tokenized by the shipped 8,192-token tokenizer (ids < 8,192 are valid in it): the
  cost of the output projection is SmolLM2's, the sentence lengths are those of the shipped tokenizer.
  Throughput needs no trained weights, so no SmolLM2 weights are read.

Text: --corpus (python-docs by default, or linux-docs, or a path) from --data-dir (../shared/data; the GPU
script copies it to .data/); without it the shipped examples/data/python-docs-excerpt.txt. Documents (lines),
each followed by a newline, are tokenized and concatenated (from_scratch_study.pack) into one stream; every cell
reads it from its start (cycled if the text is too short, which the results say), the same rows for both
models of a pair.

Training (`train` cells, batch x tokens): text tokens per second of one step, forward + backward + AdamW
(lr 1e-4) on --batch packed rows of --train-rows tokens (consecutive tokens, no padding, labels = the
rows, every token scored), in train mode, fp32 or bf16 autocast (fp32 weights), on a copy of each model.

Generation (`generate` cells, batch x prompt tokens): new tokens per second of greedy `generate` on --batches
prompts of --prompts tokens (unpadded), --new-tokens forced for both (min_new_tokens = max_new_tokens; eos
held off); fp32 or bf16 weights. The whole call is timed, reading the prompt included. Throughput depends on
sentence lengths, not content, so the SLLM's sentences end where the real text that follows each prompt ends
its sentences (measure.SentenceEndsAt, on the device, no sync): untrained modules write realistic lengths.
Peak memory of the process during the call: on CUDA torch.cuda.max_memory_allocated after
reset_peak_memory_stats (weights included; `allocated_before` is what was held before the call); on CPU
there are no allocator statistics, so it is resource.getrusage's ru_maxrss, the process's peak RSS so far:
monotone over the run, an upper bound for a cell, not its own figure. Peak bytes of every cache: the SLLM's
`peak_cache_bytes` from generate(..., return_dict_in_generate=True) (its sentence cache and its decoder's
cache), the token LM's KV cache after the call (cache_nbytes; it only grows). Also noted: the SLLM's decoder
steps (steps of the batch) per new token in its last call: 1 + 1 / sentence length at batch 1, more where rows
wait for each other.

--peer-compiled: the token LM's train cells run a compiled copy (torch.compile; the warm-up step compiles), and
its generate cells run it in its best CPU mode, `model.forward = torch.compile(
model.forward, dynamic=False)` with generate(..., cache_implementation="static") (Transformers' own compile_config
path does not compile on CPU); the warm-up call compiles, and its seconds are in the JSON (first_call_s).

--sllm-compiled: the SLLM's generate cells run `cache_implementation="static"` (its decoder steps compiled), its
train cells a copy compiled whole (`torch.compile` of the module, as Trainer's `torch_compile=True` does), which
first steps on two other sentence layouts (its compiles, first_steps_s) so the timed steps run the graphs a Trainer
runs after its first steps; an eager copy of the SLLM is timed in the same rounds (sllm_eager: both modes from one
run, and compiled / eager per round).

Timing: per cell, one warm-up call of each model, then --repeats rounds of (SLLM, token LM) calls
(measure.time_alternately), perf_counter around each call, torch.cuda.synchronize() before the clock stops on
CUDA. The ratio is SLLM tokens/s / token LM tokens/s per repeat (token LM seconds / SLLM seconds of the same
round), reported as the median and min-max over repeats; tokens/s per model as median and min-max.

Multiply-adds limit (modeling_sllm.from_scratch.multiply_adds_per_token): token LM multiply-adds / SLLM
multiply-adds per token, the throughput ratio if speed followed arithmetic alone; the SLLM's per-sentence
costs are amortised over the mean tokens per sentence of the cell's text as it segments it. Training: per
text token of the forward pass at the mean position's context, (tokens + 1) / 2; generation: per generated
token at a context of prompt + new tokens / 2.

Profile (--profile): torch.profiler over one training step (first --batch x first --train-rows, fp32) and one
generated sentence (batch 1, first --prompts, fp32, max_new_tokens = the text's mean sentence length,
prompt reading included) of each model, after a warm-up: the top operators by self CPU time (and by self
CUDA time on a GPU) and the device-to-host syncs: the counts of aten::_local_scalar_dense (what .item() and
bool() of a tensor run), aten::item, aten::nonzero, and on CUDA the runtime's cudaStreamSynchronize and
cudaDeviceSynchronize (the timing's own synchronize is one of these).

Cells: models/phase/dtype/BATCHxTOKENS, e.g. `smollm2-config/generate/bf16/256x1024`. `--skip PATTERN...`
(fnmatch) leaves cells out, and the results list each with the pattern; `--max-minutes` leaves the cells
that would start later out, listed as not run. A cell that raises (a crash in the package, out of memory) is
recorded as failed with its error, and the run goes on.

Writes OUTPUT_DIR/throughput.{json,md,png} (default benchmarks/results/throughput-cpu or -cuda): the JSON has
every call's seconds; the JSON is rewritten after every cell.
"""

import argparse
import copy
import fnmatch
import json
import math
import resource
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from matplotlib.ticker import FuncFormatter
from measure import (
    EXCERPT,
    PINNED_FIELDS,
    SHARED_DATA,
    SentenceEndsAt,
    corpus_lines,
    pack,
    reference_sentence_ends,
    run_header,
    save_results,
    shipped_pair,
    spread,
    time_alternately,
    tokens_per_sentence,
    two_panels,
)
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from modeling_sllm import SLLMConfig, SLLMForCausalLM, cache_nbytes
from modeling_sllm.configuration_sllm import BOUNDARY_FIELDS
from modeling_sllm.from_scratch import build_scratch_sllm, multiply_adds_per_token, set_generation_tokens

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SLLM, SHIPPED_TOKEN_LM = shipped_pair()
MODEL_SETS = ("shipped", "smollm2-config")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = ("sllm", "token_lm")
EAGER_SLLM = "sllm_eager"  # the SLLM's eager calls beside its compiled ones (--sllm-compiled)
# SmolLM2-135M's architecture (its config.json), without its weights; vocabulary and token ids are set apart.
SMOLLM2_LLAMA = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "intermediate_size": 1536, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192,
                 "rms_norm_eps": 1e-5, "initializer_range": 0.041666666666666664, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "attention_bias": False,
                 "mlp_bias": False, "vocab_size": 49152}  # fmt: skip
LEARNING_RATE = 1e-4
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "cudaStreamSynchronize",
               "cudaDeviceSynchronize")  # fmt: skip


# ------------------------------------------------------------------------------------------------- models


@dataclass
class Pair:
    """An SLLM and its token-level peer, fp32, eval mode."""

    name: str
    sllm: SLLMForCausalLM
    token_lm: LlamaForCausalLM
    note: str

    def models(self) -> dict:
        """{family: model}."""
        return {"sllm": self.sllm, "token_lm": self.token_lm}


def smollm2_llama_config(tokenizer) -> LlamaConfig:
    """SmolLM2-135M's Llama architecture with the shipped tokenizer's special token ids."""
    return LlamaConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **SMOLLM2_LLAMA)  # fmt: skip


def load_pair(name: str, tokenizer) -> Pair:
    """The pair --models names, fp32, in eval mode, on the CPU."""
    if name == "shipped":
        sllm = SLLMForCausalLM.from_pretrained(SHIPPED_SLLM, dtype=torch.float32)
        token_lm = LlamaForCausalLM.from_pretrained(SHIPPED_TOKEN_LM, dtype=torch.float32)
        note = f"trained weights: {SHIPPED_SLLM.name} and {SHIPPED_TOKEN_LM.name}"
        return Pair(name, sllm.eval(), token_lm.eval(), note)
    shipped = SLLMConfig.from_pretrained(SHIPPED_SLLM)
    settings = {field: getattr(shipped, field) for field in (*PINNED_FIELDS, *BOUNDARY_FIELDS)}
    config = smollm2_llama_config(tokenizer)
    torch.manual_seed(0)
    token_lm = LlamaForCausalLM(config)
    set_generation_tokens(token_lm, tokenizer)
    torch.manual_seed(0)
    sllm = build_scratch_sllm(config, tokenizer, **settings)
    note = (f"random weights (seed 0), SmolLM2-135M's Llama config with its {config.vocab_size:,}-token "
            f"vocabulary; texts tokenized by the shipped {len(tokenizer):,}-token tokenizer, the SLLM with the "
            f"shipped SLLM's sentence-module settings and boundary ids")  # fmt: skip
    return Pair(name, sllm.eval(), token_lm.eval(), note)


# --------------------------------------------------------------------------------------------------- text


def corpus_file(args) -> Path:
    """--corpus in --data-dir (or a path); the shipped excerpt when it is not there."""
    named = args.corpus in ("python-docs", "linux-docs")
    path = args.data_dir / f"{args.corpus}.txt" if named else Path(args.corpus)
    return path if path.exists() else EXCERPT


def token_stream(tokenizer, path: Path, count: int) -> tuple[torch.LongTensor, bool]:
    """(the first `count` tokens of the packed corpus [count], whether the text had to be cycled to give them)."""
    stream = pack(tokenizer, corpus_lines(path), 1, max_rows=count).flatten()
    cycled = len(stream) < count
    return stream.repeat(math.ceil(count / len(stream)))[:count], cycled


def rows_of(stream: torch.LongTensor, batch: int, width: int) -> torch.LongTensor:
    """The stream's first batch x width tokens as rows [batch, width]."""
    return stream[: batch * width].view(batch, width).clone()


def reference_tail(args, pair: Pair) -> int:
    """Tokens of real text read after each prompt for its sentence ends: the new tokens and two sentences."""
    return args.new_tokens + 2 * pair.sllm.config.max_sentence_len


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(seconds: dict[str, list[float]], tokens: int) -> dict:
    """Tokens/s per model and the per-repeat ratio SLLM / token LM (token LM seconds / SLLM seconds)."""
    ratios = [t / s for s, t in zip(seconds["sllm"], seconds["token_lm"])]
    return {"seconds": seconds, "tokens_per_call": tokens,
            "tokens_per_s": {f: spread([tokens / s for s in seconds[f]]) for f in FAMILIES},
            "ratio_per_repeat": ratios, "ratio": spread(ratios)}  # fmt: skip


def limit(pair: Pair, context: float, per_sentence: float) -> dict:
    """Multiply-adds per token of both models at `context` and token LM / SLLM: the ratio they allow."""
    sllm = multiply_adds_per_token(pair.sllm.config, context, per_sentence)["total"]
    token = multiply_adds_per_token(pair.token_lm.config, context)["total"]
    return {"context": context, "tokens_per_sentence": per_sentence, "sllm": sllm, "token_lm": token,
            "limit": token / sllm}  # fmt: skip


class TrainingSteps:
    """Training steps of a copy of each model of a pair, each with its own AdamW."""

    def __init__(self, pair: Pair, device: torch.device, peer_compiled: bool = False, sllm_compiled: bool = False):
        """`peer_compiled`: the token LM's steps run its copy compiled (`torch.compile` of the module);
        `sllm_compiled`: so do the SLLM's (as `TrainingArguments(torch_compile=True)` compiles it), and a copy of
        it steps eager beside it (EAGER_SLLM)."""
        self.device = device
        models = pair.models() | ({EAGER_SLLM: pair.sllm} if sllm_compiled else {})
        self.families = tuple(models)
        self.models = {f: copy.deepcopy(m).train().requires_grad_(True) for f, m in models.items()}
        self.optimizers = {f: torch.optim.AdamW(m.parameters(), lr=LEARNING_RATE) for f, m in self.models.items()}
        compiled = {f for f, on in (("token_lm", peer_compiled), ("sllm", sllm_compiled)) if on}
        self.calls = {f: torch.compile(m) if f in compiled else m for f, m in self.models.items()}

    def step(self, family: str, rows: torch.LongTensor, dtype: torch.dtype):
        """A call that runs one step (forward, backward, AdamW) of `family` on rows [B, T]."""
        model, optimizer = self.calls[family], self.optimizers[family]
        autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

        def call():
            with autocast:
                loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(self.device)

        return call


def train_cell(pair: Pair, trainer: TrainingSteps, rows: torch.LongTensor, dtype: torch.dtype, repeats: int) -> dict:
    """Training tokens/s of both models on the same rows [B, T], interleaved, and the multiply-adds limit. The
    compiled SLLM first steps on two other sentence layouts (the rows shifted), as a Trainer's first steps do: it
    compiles, then recompiles with dynamic shapes, and the timed steps run those graphs (seconds: first_steps_s)."""
    rows = rows.to(trainer.device)
    first_steps = {}
    if EAGER_SLLM in trainer.families:
        started = time.perf_counter()
        for shift in (rows.shape[1] // 3, rows.shape[1] // 2):
            trainer.step("sllm", rows.roll(shift, dims=1), dtype)()
        first_steps = {"first_steps_s": time.perf_counter() - started}
    seconds = time_alternately({f: trainer.step(f, rows, dtype) for f in trainer.families}, repeats)
    per_sentence = tokens_per_sentence(pair.sllm, rows)
    return speed({f: seconds[f] for f in FAMILIES}, rows.numel()) | eager_sllm(seconds, rows.numel()) | first_steps | {
        "multiply_adds": limit(pair, (rows.shape[1] + 1) / 2, per_sentence)}


def eager_sllm(seconds: dict[str, list[float]], tokens: int) -> dict:
    """With the SLLM compiled, its eager runs timed in the same rounds (EAGER_SLLM): their speed against the peer
    and compiled / eager per round; {} when they did not run."""
    if EAGER_SLLM not in seconds:
        return {}
    return {EAGER_SLLM: speed({"sllm": seconds[EAGER_SLLM], "token_lm": seconds["token_lm"]}, tokens) | {
        "compiled_over_eager": spread([e / c for c, e in zip(seconds["sllm"], seconds[EAGER_SLLM])])}}


def peak_memory(device: torch.device, before: int) -> dict:
    """The process's peak memory since `reset_memory` (CUDA) or over the run so far (CPU: ru_maxrss)."""
    if device.type == "cuda":
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device), "allocated_before_bytes": before}
    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reset_memory(device: torch.device) -> int:
    """Start a peak-memory reading; returns the bytes allocated now (CUDA; 0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


class Generator:
    """Forced-length greedy generate calls of both models of a pair on the same prompts."""

    def __init__(self, models: dict, rows: torch.LongTensor, prompt_len: int, new_tokens: int, device,
                 peer_compiled: bool = False, sllm_compiled: bool = False):  # fmt: skip
        sllm = models["sllm"]
        config = sllm.generation_config
        self.models, self.device, self.new_tokens = models, device, new_tokens
        self.peer_compiled = peer_compiled  # the token LM with a static cache and its forward compiled
        self.sllm_compiled = sllm_compiled  # the SLLM's decoder steps on its static cache, compiled
        # with the SLLM compiled, its eager calls are timed beside it (EAGER_SLLM): both modes from one run
        self.families = FAMILIES + ((EAGER_SLLM,) if sllm_compiled else ())
        self.call_seconds = {f: [] for f in self.families}  # every call's, the first (warm-up, compile) included
        self.pad_id = config.pad_token_id
        rows = rows.to(device)
        self.prompts = rows[:, :prompt_len]  # [B, P]
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        banned = eos + sllm.config.sentence_end_token_ids  # a hard end would end a sentence early
        ends = reference_sentence_ends(sllm, rows, prompt_len).to(device)
        self.forcing = SentenceEndsAt(ends, prompt_len, sllm.config.text_config.vocab_size, banned, self.pad_id)
        self.memory = {f: [] for f in self.families}
        self.cache_bytes = {f: [] for f in self.families}

    def generate(self, family: str, new_tokens: int):
        """generate's output of one call of `family`, checked to hold `new_tokens` new tokens per row (and, for
        the SLLM, whose pad token is never chosen, no pad: every row wrote them all)."""
        kwargs = {"attention_mask": torch.ones_like(self.prompts), "max_new_tokens": new_tokens,
                  "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": self.pad_id,
                  "return_dict_in_generate": True}  # fmt: skip
        model = "token_lm" if family == "token_lm" else "sllm"
        if model == "sllm":
            self.forcing.reset()
            kwargs["logits_processor"] = LogitsProcessorList([self.forcing])
        if (family == "sllm" and self.sllm_compiled) or (family == "token_lm" and self.peer_compiled):
            kwargs["cache_implementation"] = "static"
        out = self.models[model].generate(self.prompts, **kwargs)
        sync(self.device)
        new = out.sequences[:, self.prompts.shape[1] :]
        if new.shape[1] != new_tokens or (model == "sllm" and bool((new == self.pad_id).any())):
            raise RuntimeError(f"{family} wrote fewer than {new_tokens} new tokens in a row")
        return out

    def call(self, family: str):
        """A timed call of `family`: generates, notes its peak memory and its caches' peak bytes."""

        def run():
            before, started = reset_memory(self.device), time.perf_counter()
            out = self.generate(family, self.new_tokens)
            self.call_seconds[family].append(time.perf_counter() - started)
            self.memory[family].append(peak_memory(self.device, before))
            held = cache_nbytes(out.cache) if family == "token_lm" else out.peak_cache_bytes
            self.cache_bytes[family].append(int(held))

        return run


def with_compiled_peer(models: dict) -> dict:
    """The models with the token LM in its best CPU mode: a copy whose forward is compiled (`torch.compile`,
    dynamic=False; Transformers' compile_config path skips CPU), to run with a static cache."""
    peer = copy.deepcopy(models["token_lm"])
    peer.forward = torch.compile(peer.forward, dynamic=False)
    return models | {"token_lm": peer}


def generate_cell(pair: Pair, models: dict, rows: torch.LongTensor, prompt_len: int, args) -> dict:
    """Generation tokens/s of both models on the same prompts, interleaved, peak memory and cache bytes, and
    the multiply-adds limit at the mean context."""
    runner = Generator(models, rows, prompt_len, args.new_tokens, args.device, args.peer_compiled, args.sllm_compiled)
    seconds = time_alternately({f: runner.call(f) for f in runner.families}, args.repeats)
    per_sentence = tokens_per_sentence(pair.sllm, rows)
    context = prompt_len + args.new_tokens / 2
    tokens = len(rows) * args.new_tokens
    return speed({f: seconds[f] for f in FAMILIES}, tokens) | eager_sllm(seconds, tokens) | {
        "multiply_adds": limit(pair, context, per_sentence),
        "peak_memory": {f: runner.memory[f][-1] for f in FAMILIES},
        "peak_cache_bytes": {f: max(runner.cache_bytes[f]) for f in FAMILIES},
        "sllm_decoder_steps_per_new_token": runner.forcing.calls / args.new_tokens,
        "first_call_s": {f: runner.call_seconds[f][0] for f in FAMILIES},  # the warm-up: a compile, if any
        "token_lm_mode": "compiled, static cache" if args.peer_compiled else "eager, dynamic cache",
        "sllm_mode": "decoder steps compiled, static cache" if args.sllm_compiled else "eager, dynamic cache",
    }


# ------------------------------------------------------------------------------------------------ profile


def profiled(call, device: torch.device, top: int) -> dict:
    """One warm-up call, then one under torch.profiler: the top operators by self time and the sync counts."""
    from torch.profiler import ProfilerActivity, profile

    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
    events = prof.key_averages()
    counts = {name: sum(e.count for e in events if e.key == name) for name in SYNC_EVENTS}
    result = {"syncs": {name: n for name, n in counts.items() if n},
              "aten_syncs": counts["aten::_local_scalar_dense"] + counts["aten::nonzero"],
              "operator_calls": sum(e.count for e in events if e.key.startswith("aten::"))}  # fmt: skip
    times = {"self_cpu_ms": "self_cpu_time_total"}
    if device.type == "cuda":
        times["self_cuda_ms"] = "self_device_time_total"
        result["runtime_syncs"] = counts["cudaStreamSynchronize"] + counts["cudaDeviceSynchronize"]
    for label, attribute in times.items():
        ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]
        result[f"top_by_{label}"] = [{"op": e.key, "calls": e.count, label: getattr(e, attribute) / 1e3}
                                     for e in ranked]  # fmt: skip
    return result


def profile_pair(pair: Pair, stream: torch.LongTensor, args) -> dict:
    """Profiles of one training step and one generated sentence of each model of the pair (fp32)."""
    batch, tokens, prompt_len = args.batch[0], args.train_rows[0], args.prompts[0]
    train_rows = rows_of(stream, batch, tokens)
    gen_rows = rows_of(stream, 1, prompt_len + reference_tail(args, pair))
    sentence = max(1, round(tokens_per_sentence(pair.sllm, gen_rows)))
    trainer = TrainingSteps(pair, args.device)
    runner = Generator(pair.models(), gen_rows, prompt_len, sentence, args.device, sllm_compiled=args.sllm_compiled)
    moved = train_rows.to(args.device)
    result = {"train_step": f"{batch}x{tokens}",
              "generate": f"batch 1, {prompt_len}-token prompt, {sentence} new tokens"}  # fmt: skip
    for family in FAMILIES:
        result[family] = {
            "train_step": profiled(trainer.step(family, moved, torch.float32), args.device, args.profile_top),
            "generated_sentence": profiled(partial(runner.generate, family, sentence), args.device, args.profile_top),
        }
    return result


# ------------------------------------------------------------------------------------------------ the grid


def cells(args) -> list[dict]:
    """Every cell of the grid, in run order: per model set, training then generation, per dtype."""
    grid = []
    for models in args.models:
        for phase, sizes in (("train", [(b, t) for t in args.train_rows for b in args.batch]),
                             ("generate", [(b, p) for p in args.prompts for b in args.batches])):  # fmt: skip
            if phase not in args.phases:
                continue
            for dtype in args.dtypes:
                for batch, tokens in sizes:
                    cell_id = f"{models}/{phase}/{dtype}/{batch}x{tokens}"
                    grid.append({"id": cell_id, "models": models, "phase": phase, "dtype": dtype, "batch": batch,
                                 "tokens": tokens})  # fmt: skip
    return grid


def skipped_by(cell_id: str, patterns: list[str]) -> str | None:
    """The first --skip pattern that matches the cell id, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(cell_id, p)), None)


def run_cell(cell: dict, pair: Pair, stream: torch.LongTensor, state: dict, args) -> dict:
    """Measure one cell; `state` keeps the pair's training copies and bf16 weights between cells."""
    dtype = DTYPES[cell["dtype"]]
    if cell["phase"] == "train":
        if "trainer" not in state:
            state["trainer"] = TrainingSteps(pair, args.device, args.peer_compiled, args.sllm_compiled)
        return train_cell(pair, state["trainer"], rows_of(stream, cell["batch"], cell["tokens"]), dtype, args.repeats)
    if cell["dtype"] not in state:
        state[cell["dtype"]] = {f: copy.deepcopy(m).to(dtype) if dtype != torch.float32 else m
                                for f, m in pair.models().items()}  # fmt: skip
        if args.peer_compiled:
            state[cell["dtype"]] = with_compiled_peer(state[cell["dtype"]])
    rows = rows_of(stream, cell["batch"], cell["tokens"] + reference_tail(args, pair))
    return generate_cell(pair, state[cell["dtype"]], rows, cell["tokens"], args)


def failure(error: BaseException) -> dict:
    """A failed cell's status and error."""
    return {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked; --device as a torch.device."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODEL_SETS, default=list(MODEL_SETS))
    parser.add_argument("--phases", nargs="+", choices=("train", "generate"), default=["train", "generate"])
    parser.add_argument("--train-rows", type=int, nargs="+", default=[256, 1024], help="tokens per training row")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="rows per training step")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256], help="generation batch sizes")
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 1024], help="prompt tokens for generation")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per row, forced for both models")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="training: fp32 or bf16 autocast; generation: fp32 or bf16 weights")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per cell, after one warm-up")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PATTERN",
                        help="leave out the cells whose id (models/phase/dtype/BATCHxTOKENS) matches (fnmatch)")
    parser.add_argument("--max-minutes", type=float, help="start no cell after this many minutes (listed as not run)")
    parser.add_argument("--profile", action="store_true", help="profile a training step and a generated sentence")
    parser.add_argument("--peer-compiled", action="store_true",
                        help="the token LM in its best CPU mode: generate cells compile its forward "
                        "(torch.compile, dynamic=False) and use a static cache, its first call (the compile) reported "
                        "apart as first_call_s; train cells compile its training copy (torch.compile); the warm-up "
                        "step compiles")  # fmt: skip
    parser.add_argument("--sllm-compiled", action="store_true",
                        help="generate cells run the SLLM with cache_implementation='static': its decoder steps on "
                        "fixed-shape row slots, compiled (torch.compile; CUDA graphs on a GPU), the first call (the "
                        "compile) reported apart as first_call_s; train cells compile its training copy (torch.compile, "
                        "as TrainingArguments(torch_compile=True) does), first_steps_s the compiles on two other "
                        "layouts; the SLLM eager is timed in the same rounds")  # fmt: skip
    parser.add_argument("--profile-top", type=int, default=12, help="operators listed per profile")
    parser.add_argument("--corpus", default="python-docs", help="python-docs, linux-docs (in --data-dir) or a path")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, help="default benchmarks/results/throughput-cpu (or -cuda)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.peer_compiled or args.sllm_compiled:  # every cell's shapes compile once; the default limit of 8 would fall back to eager
        torch._dynamo.config.cache_size_limit = 64
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible to torch")
    if min(args.train_rows + args.batch + args.batches + args.prompts + [args.new_tokens, args.repeats]) < 1:
        parser.error("sizes, --new-tokens and --repeats must be positive")
    if args.output_dir is None:
        args.output_dir = ROOT / "benchmarks" / "results" / f"throughput-{args.device.type}"
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the grid, cell by cell, and write the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKEN_LM)
    corpus = corpus_file(args)
    grid = cells(args)
    results = run_header(args.device) | {
        "settings": {k: str(v) if isinstance(v, Path | torch.device) else v for k, v in vars(args).items()},
        "corpus": str(corpus), "corpus_is_excerpt": corpus == EXCERPT, "models": {}, "cells": [],
    }  # fmt: skip
    pairs = {}
    for cell in (bar := tqdm(grid, desc="cells", unit="cell")):
        bar.set_postfix_str(cell["id"])
        pattern = skipped_by(cell["id"], args.skip)
        if pattern is not None:
            results["cells"].append(cell | {"status": "skipped", "by": f"--skip {pattern}"})
            continue
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            results["cells"].append(cell | {"status": "not run", "by": f"--max-minutes {args.max_minutes:g}"})
            continue
        try:
            if cell["models"] not in pairs:
                pairs.clear()  # one model set in memory at a time
                pairs[cell["models"]] = prepare_pair(cell["models"], tokenizer, corpus, args, results)
            pair, stream, state = pairs[cell["models"]]
            results["cells"].append(cell | {"status": "ok"} | run_cell(cell, pair, stream, state, args))
        except Exception as error:  # noqa: BLE001 - a failing cell is a result, the grid goes on
            results["cells"].append(cell | failure(error))
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        report_cell(results["cells"][-1])
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "throughput.json").write_text(json.dumps(results, indent=2))
    results["wall_seconds"] = time.perf_counter() - started
    write_results(results, args.output_dir)
    print(f"wrote {args.output_dir}/throughput.{{json,md,png}} in {results['wall_seconds']:.0f} s")


def prepare_pair(name: str, tokenizer, corpus: Path, args, results: dict) -> tuple[Pair, torch.LongTensor, dict]:
    """Load a pair onto the device, read the text its cells need and, with --profile, profile it."""
    pair = load_pair(name, tokenizer)
    pair.sllm.to(args.device)
    pair.token_lm.to(args.device)
    tail = reference_tail(args, pair)
    needed = max([b * t for b in args.batch for t in args.train_rows]
                 + [b * (p + tail) for b in args.batches for p in args.prompts])  # fmt: skip
    stream, cycled = token_stream(tokenizer, corpus, needed)
    parameters = {f: sum(p.numel() for p in m.parameters()) for f, m in pair.models().items()}
    entry = {"note": pair.note, "parameters": parameters, "text_tokens_read": needed, "text_cycled": cycled}
    results["models"][name] = entry
    if args.profile:
        try:
            entry["profile"] = profile_pair(pair, stream, args)
        except Exception as error:  # noqa: BLE001 - reported, the grid goes on
            entry["profile"] = failure(error)
    return pair, stream, {}


# ---------------------------------------------------------------------------------------------------- output


def report_cell(cell: dict) -> None:
    """One line per measured cell on the console."""
    if cell["status"] != "ok":
        tqdm.write(f"{cell['id']}: {cell['status']} {cell.get('error', '')}")
        return
    rate, ratio = cell["tokens_per_s"], cell["ratio"]
    tqdm.write(f"{cell['id']}: SLLM {rate['sllm']['median']:.1f} tok/s, token LM {rate['token_lm']['median']:.1f} "
               f"tok/s, ratio {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}), multiply-adds limit "
               f"{cell['multiply_adds']['limit']:.2f}x")  # fmt: skip


def size(n: int | None) -> str:
    """Bytes in MiB."""
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def memory_text(memory: dict) -> str:
    """A peak-memory reading for the table: CUDA peak (+ above what was held before), or CPU max RSS."""
    if "peak_allocated_bytes" in memory:
        peak = memory["peak_allocated_bytes"]
        return f"{size(peak)} (+{size(peak - memory['allocated_before_bytes'])})"
    return size(memory["max_rss_bytes"])


def table_row(cell: dict) -> str:
    """A cell's row of the Markdown table (skipped, not run and failed cells say why)."""
    head = f"| {cell['models']} | {cell['phase']} | {cell['dtype']} | {cell['batch']} x {cell['tokens']:,} |"
    if cell["status"] != "ok":
        why = cell.get("by") or cell.get("error", "").replace("|", "/").replace("\n", " ")[:200]
        return head + f" {cell['status']}: {why} |" + " |" * 5
    rate, ratio = cell["tokens_per_s"], cell["ratio"]
    cells = [f"{rate[f]['median']:,.1f} ({rate[f]['min']:,.1f}-{rate[f]['max']:,.1f})" for f in FAMILIES]
    cells += [f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})",
              f"{cell['multiply_adds']['limit']:.2f}x"]
    if EAGER_SLLM in cell:  # the SLLM eager in the same rounds
        eager = cell[EAGER_SLLM]
        cells[-2] += (f"; SLLM eager {eager['tokens_per_s']['sllm']['median']:,.1f} tok/s, "
                      f"{eager['ratio']['median']:.2f}x ({eager['ratio']['min']:.2f}-{eager['ratio']['max']:.2f}); "
                      f"compiled / eager {eager['compiled_over_eager']['median']:.2f}x")  # fmt: skip
    if cell["phase"] == "generate":
        cells += [" / ".join(memory_text(cell["peak_memory"][f]) for f in FAMILIES),
                  " / ".join(size(cell["peak_cache_bytes"][f]) for f in FAMILIES)]  # fmt: skip
    else:
        cells += ["-", "-"]
    return head + " " + " | ".join(cells) + " |"


def profile_lines(results: dict) -> list[str]:
    """The profile section: syncs per step and the top operators of each model."""
    lines = []
    for name, entry in results["models"].items():
        profile = entry.get("profile")
        if profile is None:
            continue
        lines += ["", f"### Profile: {name}", ""]
        if profile.get("status") == "failed":
            lines.append(f"failed: {profile['error']}")
            continue
        lines += [f"Training step {profile['train_step']} (fp32); generated sentence: {profile['generate']} (fp32).",
                  "", "| model | what | aten syncs | runtime syncs | top operators by self time (ms) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for family in FAMILIES:
            for what, p in profile[family].items():
                key = "top_by_self_cuda_ms" if "top_by_self_cuda_ms" in p else "top_by_self_cpu_ms"
                label = key.removeprefix("top_by_")
                top = ", ".join(f"{o['op']} {o[label]:.1f}" for o in p[key][:5])
                lines.append(f"| {family} | {what} | {p['aten_syncs']} | {p.get('runtime_syncs', '-')} | {top} |")
    return lines


def write_results(results: dict, output_dir: Path) -> None:
    """throughput.json, throughput.md (header, table, profiles) and throughput.png (ratios and limits)."""
    machine, versions = results["machine"], results["versions"]
    gpu = f", {machine['gpu']}" if "gpu" in machine else ""
    where = f"{machine['cpu']}, {machine['torch_threads']} threads{gpu}"
    s = results["settings"]
    lines = [
        "# Throughput: SLLM / token LM",
        "",
        (f"`{results['command']}`; {results['date']}, commit {results['git_commit']}"
         f"{' (uncommitted changes)' if results['git_dirty'] else ''}; {where}; torch {versions['torch']}, "
         f"transformers {versions['transformers']}; text {Path(results['corpus']).name}."),
        "",
        *[f"- {name}: {entry['note']}." for name, entry in results["models"].items()],
        *(["- the token LM generates in its best CPU mode: its forward compiled (torch.compile, dynamic=False) with a "
           "static cache; each generate cell's first call compiles (first_call_s in the JSON; warm-up, not timed)."]
          if s.get("peer_compiled") else []),
        *(["- the SLLM generates with cache_implementation=\"static\": its decoder steps on fixed-shape row slots, "
           "compiled; its first call per cell compiles (first_call_s; warm-up, not timed). It trains compiled whole "
           "(torch.compile, as Trainer's torch_compile=True), after steps on two other layouts (first_steps_s). "
           "Its eager calls are timed in the same rounds (SLLM eager)."]
          if s.get("sllm_compiled") else []),
        "",
        f"tok/s: median (min-max) of {s['repeats']} interleaved repeats after one warm-up; ratio = SLLM tok/s / "
        "token LM tok/s per repeat, median (min-max); limit = token LM / SLLM multiply-adds per token. Training: "
        "text tokens/s of forward + backward + AdamW (bf16 = autocast). Generation: new tokens/s of the whole "
        f"greedy generate call, {s['new_tokens']} new tokens forced for both (bf16 = bf16 weights). Peak memory "
        + ("(CUDA): max_memory_allocated during the call (+ above what was held before)."
           if "gpu" in machine else "(CPU): the process's peak RSS so far (ru_maxrss), monotone over the run: "
           "an upper bound, not the cell's own figure.")
        + " Caches: the SLLM's peak_cache_bytes (every cache) / the token LM's KV cache after the call.",
        "",
        ("| models | phase | dtype | batch x tokens | SLLM tok/s | token LM tok/s | ratio | limit | peak memory "
         "SLLM / token LM | peak caches SLLM / token LM |"),
        "|---|---|---|---|---|---|---|---|---|---|",
        *[table_row(cell) for cell in results["cells"]],
        *profile_lines(results),
    ]  # fmt: skip
    fig, left, right = two_panels("SLLM / token LM throughput (bars: min-max over repeats; x: multiply-adds limit)",
                                  (None, None), ("training: text tokens/s, SLLM / token LM",
                                                 "generation: new tokens/s, SLLM / token LM"), size=(14, 5))  # fmt: skip
    ratio_format = FuncFormatter(lambda value, _: f"{value:g}x")
    for ax, phase in ((left, "train"), (right, "generate")):
        done = [c for c in results["cells"] if c["phase"] == phase and c["status"] == "ok"]
        x = list(range(len(done)))
        medians = [c["ratio"]["median"] for c in done]
        errors = [[m - c["ratio"]["min"] for m, c in zip(medians, done)],
                  [c["ratio"]["max"] - m for m, c in zip(medians, done)]]  # fmt: skip
        limits = [c["multiply_adds"]["limit"] for c in done]
        ax.errorbar(x, medians, yerr=errors, fmt="o", capsize=3, label="measured")
        ax.scatter(x, limits, marker="x", color="tab:red", label="multiply-adds limit")
        ax.axhline(1.0, color="grey", lw=0.8)
        labels = [f"{c['models']} {c['dtype']} {c['batch']}x{c['tokens']}" for c in done]
        ax.set_xticks(x, labels, rotation=70, fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ratio_format)
        ax.yaxis.set_minor_formatter(ratio_format)
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.legend(fontsize=7)
    save_results(output_dir, "throughput", results, lines, fig)


if __name__ == "__main__":
    main()
