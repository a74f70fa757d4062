"""What the benchmarks measure with, in one place: the studies' pinned variants, data, padding, sentence-length
forcing, perplexity on the same tokens for an SLLM and its backbone, reconstruction, interleaved timing, and
results on disk.

The benchmarks run as `python benchmarks/NAME.py`, which puts this folder on sys.path: `from measure import ...`.
"""

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LogitsProcessor, PreTrainedConfig

from modeling_sllm import SLLMConfig, training
from modeling_sllm.configuration_sllm import BOUNDARY_FIELDS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The data, examples/train_sllm.py's default: the shared corpora beside the repository (training text, held-out
# text), else the shipped excerpt for both.
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_CORPORA = (SHARED_DATA / "linux-docs.txt", SHARED_DATA / "python-docs.txt")
EXCERPT = REPO / "examples" / "data" / "python-docs-excerpt.txt"
TRAIN_TEXT, HELD_OUT_TEXT = SHARED_CORPORA if all(p.exists() for p in SHARED_CORPORA) else (EXCERPT, EXCERPT)
VARIANTS_DIR = Path(__file__).parent / "variants"


def shipped_pair() -> tuple[Path, Path]:
    """The shipped equal-perplexity pair's folders (SLLM, token LM), as checkpoints/shipped_pair.json names them."""
    pair = json.loads((REPO / "checkpoints" / "shipped_pair.json").read_text())
    return REPO / "checkpoints" / pair["sllm"]["folder"], REPO / "checkpoints" / pair["token_lm"]["folder"]


def corpus_lines(path: Path) -> list[str]:
    """The non-empty lines (documents) of a corpus file; a clear exit where it is missing."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: the study needs the shared corpora (see ../shared/data/README.md)")
    return [line for line in path.read_text().splitlines() if line.strip()]


def pack(tokenizer, lines: list[str], block_size: int, max_rows: int | None = None) -> torch.LongTensor:
    """Documents, each followed by a newline, concatenated and cut into rows [R, block_size] (the rest dropped)."""
    ids = []
    for start in range(0, len(lines), 1000):
        for row in tokenizer([line + "\n" for line in lines[start : start + 1000]]).input_ids:
            ids += row
        if max_rows is not None and len(ids) >= max_rows * block_size:
            break
    count = len(ids) // block_size if max_rows is None else min(max_rows, len(ids) // block_size)
    return torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)


def tokens_per_sentence(model, rows: torch.LongTensor) -> float:
    """Mean tokens per sentence of `rows` as the SLLM segments them."""
    seg = model.segment(rows.to(model.device))
    return float(seg.lengths.sum()) / float(seg.num_sentences.sum())


def spread(values: list[float]) -> dict | None:
    """Median, min and max of repeated figures (per-repeat ratios included); None for no values."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}

# Every SLLMConfig field that defines the sentence modules: all its own fields but the backbone config, the
# boundary token ids (they come from the tokenizer) and `objective` (from the command: stage 1 or stage 2). A
# study variant writes out each of them, so a rerun gives the model that was run whatever today's defaults
# are; a field added to SLLMConfig makes every variant file incomplete until it says what its runs used.
PINNED_FIELDS = tuple(
    f.name for f in dataclasses.fields(SLLMConfig)
    if f.name not in {g.name for g in dataclasses.fields(PreTrainedConfig)}
    and f.name not in {"text_config", "objective", *BOUNDARY_FIELDS}
)  # fmt: skip


def check_pinned_config(config: object, where: str) -> dict:
    """`config` if it names every field of PINNED_FIELDS and nothing else, with values SLLMConfig accepts
    (checked on a default backbone config); otherwise SystemExit saying which fields are wrong and where."""
    if not isinstance(config, dict):
        raise SystemExit(f"{where}: 'config' must be an object of SLLMConfig fields, got {type(config).__name__}")
    missing = [name for name in PINNED_FIELDS if name not in config]
    unknown = sorted(set(config) - set(PINNED_FIELDS))
    if missing or unknown:
        raise SystemExit(
            f"{where}: a variant pins every sentence-module field of SLLMConfig (no defaults are filled in); "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"not pinnable here {unknown} (the pinned fields: {list(PINNED_FIELDS)})" if unknown else "")
        )
    gone = [name for name in PINNED_FIELDS if not hasattr(SLLMConfig, name)]
    if gone:
        raise SystemExit(f"{where}: SLLMConfig no longer has {gone}; update PINNED_FIELDS and the variant files")
    try:
        SLLMConfig(**config)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{where}: {error}") from None
    return config


def load_study(path: Path, extra_keys: tuple[str, ...] = ()) -> dict:
    """A study's variant file: {"about": ..., "variants": [{"name", "config", "as_run", *extra_keys}], ...},
    checked when it is read (every variant fully pinned, names unique); returns the file's object with
    "variants" as {name: variant}, in the file's order."""
    try:
        study = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"variant file {path}: {error}") from None
    variants = {}
    for i, variant in enumerate(study.get("variants") or []):
        where = f"{path}: variant {i} ({variant.get('name', 'no name')!r})"
        absent = [key for key in ("name", "config", "as_run", *extra_keys) if key not in variant]
        if absent:
            raise SystemExit(f"{where}: missing {absent}")
        if variant["name"] in variants:
            raise SystemExit(f"{where}: the name is used twice")
        check_pinned_config(variant["config"], where)
        variants[variant["name"]] = variant
    if not variants:
        raise SystemExit(f"variant file {path}: no 'variants'")
    return study | {"variants": variants}


def differing_fields(config, pinned: dict) -> dict:
    """{field: (config's value, pinned value)} for the pinned fields where an SLLMConfig differs."""
    return {k: (getattr(config, k), v) for k, v in pinned.items() if getattr(config, k) != v}


def pad(rows: list, pad_id: int = 0, left: bool = False) -> dict:
    """Token rows (lists or 1-D tensors) -> a batch {input_ids, attention_mask, labels}, each [B, T]:
    right padded for scoring (labels -100 on padding), or left padded for generation."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, columns], mask[i, columns] = torch.as_tensor(row, dtype=torch.long), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def data_rows(tokenizer, block_size: int, eval_rows: int, train_documents: int | None = None):
    """(train rows, held-out rows) exactly as the training script (modeling_sllm.training) builds them from its
    default data: the held-out rows are the 512 x 256-token rows that quality figures are quoted on."""
    eval_file = str(HELD_OUT_TEXT) if HELD_OUT_TEXT != TRAIN_TEXT else None  # the excerpt alone: 10% held out
    data_args = training.DataArguments(train_file=str(TRAIN_TEXT), eval_file=eval_file, block_size=block_size,
                                       max_eval_samples=eval_rows)  # fmt: skip
    train_texts, eval_texts = training.load_texts(data_args)
    if train_documents is not None:
        train_texts = train_texts.select(range(min(train_documents, len(train_texts))))
    train = training.tokenize(train_texts, tokenizer, data_args, None)
    return train, training.tokenize(eval_texts, tokenizer, data_args, eval_rows)


def corpus_sentences(model, tokenizer, path: Path, count: int, min_len: int, max_len: int) -> list[list[int]]:
    """The first `count` sentences of min_len..max_len tokens in a corpus, as the model segments them."""
    found = []
    with path.open() as lines:
        for line in lines:
            seg = model.segment(tokenizer(line, return_tensors="pt").input_ids)
            for sentence, length in zip(seg.sentences[0], seg.lengths[0]):
                if min_len <= length <= max_len:
                    found.append(sentence[:length].tolist())
            if len(found) >= count:
                return found[:count]
    return found


def reference_rows(tokenizer, model, count: int, prompt_sentences: int, min_tokens: int):
    """Held-out paragraphs long enough to give a prompt and `min_tokens` // 4 tokens of real continuation:
    [(prompt token ids, lengths of the sentences that follow it)]."""
    rows = []
    for line in HELD_OUT_TEXT.read_text().splitlines():
        ids = tokenizer(line, return_tensors="pt").input_ids
        seg = model.segment(ids)
        lengths = seg.lengths[0][seg.lengths[0] > 0].tolist()
        if len(lengths) <= prompt_sentences or sum(lengths[prompt_sentences:]) < min_tokens // 4:
            continue
        prompt_len = sum(lengths[:prompt_sentences])
        rows.append((ids[0, :prompt_len], lengths[prompt_sentences:]))
        if len(rows) == count:
            return rows
    raise RuntimeError("not enough held-out paragraphs for the prompts")


class ReferenceSentenceLengths(LogitsProcessor):
    """Makes each generated sentence as long as the next real sentence of its row's reference text.

    Rows move on their own, so each row's progress is read from its own tokens: with
    `written` new tokens, the row is at the end of its k-th sentence when `written` equals the
    sum of the first k reference lengths, and the sentence-end class is forced once there
    (sentences of `max_sentence_len` tokens end by themselves). Pad and eos are never chosen,
    so a row's new tokens are its non-pad tokens after the prompt.
    """

    def __init__(self, prompt_lens: list[int], lengths: list[list[int]], end_class: int, banned: list[int],
                 pad_id: int, max_sentence_len: int):  # fmt: skip
        self.prompt_lens, self.end_class, self.pad_id = prompt_lens, end_class, pad_id
        self.banned = sorted(set(banned) | {pad_id})
        self.ends = []  # per row: token counts at which its sentences end (the reference cycled)
        self.auto = []  # per row: whether that sentence ends by itself (max_sentence_len tokens)
        for row in lengths:
            cycled = (row * (1 + 4096 // max(sum(row), 1)))[:4096]
            self.ends.append(torch.tensor(cycled).cumsum(0).tolist())
            self.auto.append([length >= max_sentence_len for length in cycled])
        self.reset()

    def reset(self):
        self.ended = [0] * len(self.ends)  # sentences each row has ended
        self.calls = 0  # decoder steps

    def __call__(self, input_ids, scores):
        scores[:, self.banned] = -float("inf")
        written = (input_ids != self.pad_id).sum(1) - torch.tensor(self.prompt_lens)
        for row, ends in enumerate(self.ends):
            k = self.ended[row]
            while self.auto[row][k] and written[row] >= ends[k]:  # ended by max_sentence_len
                k += 1
            if written[row] == ends[k]:  # this row's sentence is complete: end it
                scores[row] = -float("inf")
                scores[row, self.end_class] = 0.0
                k += 1
            else:
                scores[row, self.end_class] = -float("inf")
            self.ended[row] = k
        self.calls += 1
        return scores


@torch.no_grad()
def sllm_perplexity(model, rows: list[list[int]], batch_size: int) -> dict:
    """Next-sentence perplexity per text token: exp(text_loss), every token scored plus its sentence-end and
    end-of-text decisions. Measured in eval mode (no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    nll = tokens = 0.0
    for start in tqdm(range(0, len(rows), batch_size), desc="SLLM perplexity", unit="batch", leave=False):
        out = model(**pad(rows[start : start + batch_size]), return_logits=False, objective="next_sentence")
        nll, tokens = nll + float(out.text_loss) * float(out.num_tokens), tokens + float(out.num_tokens)
    model.train(was_training)
    return {"nll": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens)}


@torch.no_grad()
def backbone_perplexity(llm, rows: list[list[int]], batch_size: int, bos: int, eos: int) -> dict:
    """The same rows for a plain causal LM: every text token scored (the first after bos) plus eos after
    the last (its end-of-text decision), over the same number of text tokens."""
    nll = tokens = 0.0
    for start in tqdm(range(0, len(rows), batch_size), desc="backbone perplexity", unit="batch", leave=False):
        chunk = rows[start : start + batch_size]
        batch = pad([[bos, *r, eos] for r in chunk])  # [B, T+2]
        logits = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]  # [B, T+1]: every text token and the eos; bos and padding -100
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"))
        tokens += sum(len(r) for r in chunk)
    return {"nll": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens)}


@torch.no_grad()
def reconstruction_metrics(model, sentences: list[list[int]]) -> dict:
    """Sentence-VAE reconstruction of `sentences` (objective "reconstruction", full softmax):
    teacher-forced token accuracy (tokens and sentence ends) and exact match (every one right). Measured in
    eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = targets = exact = count = 0.0
    for start in range(0, len(sentences), 64):
        out = model(**pad(sentences[start : start + 64]), objective="reconstruction")
        n_targets = out.num_tokens + out.num_sentences
        correct += float(out.token_accuracy * n_targets)
        targets += float(n_targets)
        exact += float(out.exact_match * out.num_sentences)
        count += float(out.num_sentences)
    model.train(was_training)
    return {"token_accuracy": correct / targets, "exact_match": exact / count}


def time_alternately(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of each run, `repeats` calls each after one warm-up call each; the calls take turns
    (a, b, a, b, ...) so that a change in the machine's load falls on every run alike."""
    for run in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def two_panels(title: str, xlabels: tuple[str | None, str | None], ylabels: tuple[str, str], size=(11, 4)):
    """A titled figure of two labelled plots side by side: (figure, left axes, right axes)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=size)
    fig.suptitle(title)
    for ax, xlabel, ylabel in zip((left, right), xlabels, ylabels):
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig, left, right


def save_results(output_dir: Path, name: str, results: dict, table: list[str], figure: plt.Figure) -> None:
    """Write `name`.json (for machines), `name`.md (the table, for the README) and `name`.png into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (output_dir / f"{name}.md").write_text("\n".join(table) + "\n")
    figure.tight_layout()
    figure.savefig(output_dir / f"{name}.png", dpi=120)
    plt.close(figure)


def write_shipped_readme(folder: Path, card: Path, command: str) -> None:
    """A README for shipped sentence modules, from model_cards/shipped_sentence_modules_readme.md: what they are,
    how to load them, where their numbers are."""
    size = (folder / "sentence_modules.safetensors").stat().st_size / 2**20
    template = (REPO / "model_cards" / "shipped_sentence_modules_readme.md").read_text()
    (folder / "README.md").write_text(
        template.format(command=command, size=f"{size:.1f}", folder=f"{folder.parent.name}/{folder.name}",
                        card=card.as_posix())  # fmt: skip
    )


def variants_file_option(default: Path, what: str) -> tuple[argparse.ArgumentParser, Path]:
    """`--variants-file`, read before the rest of a study's command line (its variants name the choices of
    `--variant`, which must not be read as an abbreviation of it): (the parser, a parent of the study's
    own, so that its help lists the option; the file)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--variants-file", type=Path, default=default, help=what)
    return pre, pre.parse_known_args()[0].variants_file


@torch.no_grad()
def same_tokens_perplexity(model, rows: list[list[int]], batch_size: int, bos: int | None = None,
                           eos: int | None = None, autocast_dtype: torch.dtype | None = None) -> dict:  # fmt: skip
    """Perplexity per text token of `rows` on the model's own device (a GPU too), for either family, with the
    definitions of `sllm_perplexity` and `backbone_perplexity`: an SLLM (`bos`/`eos` None) scores every token
    plus its sentence-end and end-of-text decisions, exp(its text_loss); a plain causal LM reads bos + row + eos and
    scores every text token and the eos. The denominator is the number of text tokens for both, so the two
    figures are comparable. `autocast_dtype` (e.g. torch.bfloat16 on cuda): run the forward passes under
    autocast (the NLL is summed in fp32). Measured in eval mode; the model's mode is restored."""
    is_sllm = bos is None
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    was_training = model.training
    model.eval()
    nll = tokens = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if is_sllm:
            batch = {k: v.to(device) for k, v in pad(chunk).items()}
            with autocast:
                out = model(**batch, return_logits=False, objective="next_sentence")
            nll += float(out.text_loss) * float(out.num_tokens)
            tokens += float(out.num_tokens)
            continue
        batch = {k: v.to(device) for k, v in pad([[bos, *r, eos] for r in chunk]).items()}  # [B, T+2]
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]  # [B, T+1]: every text token and the eos; padding -100
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"))
        tokens += sum(len(r) for r in chunk)
    model.train(was_training)
    return {"nll": nll, "tokens": tokens, "perplexity": math.exp(min(nll / tokens, 50))}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speed, perplexity) points no other point beats on both (faster and at most as perplexed),
    sorted by speed: the frontier of one family."""
    front, best = [], math.inf
    for speed, perplexity in sorted(points, key=lambda p: (-p[0], p[1])):
        if perplexity < best:
            front.append((speed, perplexity))
            best = perplexity
    return sorted(front)


def reference_sentence_ends(model, rows: torch.LongTensor, prompt_len: int) -> torch.LongTensor:
    """Where the real text of rows [B, T] ends its sentences after its first `prompt_len` tokens, as the SLLM
    `model` segments it: [B, S] counts of new tokens at each end (-1: none), for `SentenceEndsAt`. Pieces of
    max_sentence_len tokens are left out: generation ends those by itself."""
    seg = model.segment(rows)
    ends = seg.lengths.cumsum(1)  # [B, S] the segmentation is lossless: sentences follow each other
    keep = seg.sentence_mask & (ends > prompt_len) & (seg.lengths < model.config.max_sentence_len)
    return torch.where(keep, ends - prompt_len, -1)


class SentenceEndsAt(LogitsProcessor):
    """Makes an SLLM end each generated sentence where `reference_sentence_ends` says, and nowhere else.

    What `ReferenceSentenceLengths` does, as whole-batch tensor operations on the model's device: no Python
    loop over rows and no device-to-host copy, so that on a GPU the measuring tool costs the SLLM no sync per
    row and step. Prompts are unpadded `prompt_len` tokens with no pad token in them; pad and `banned` (eos,
    hard sentence ends) are never chosen, so a row's written count is its non-pad tokens after the prompt.
    `calls` counts the decoder steps.
    """

    def __init__(self, ends: torch.LongTensor, prompt_len: int, end_class: int, banned: list[int], pad_id: int):
        self.ends, self.prompt_len, self.end_class, self.pad_id = ends, prompt_len, end_class, pad_id
        self.banned = torch.tensor(sorted(set(banned) | {pad_id}), device=ends.device)
        self.reset()

    def reset(self):
        self.ended = None  # [B] each row's written count at its last forced end
        self.calls = 0

    def __call__(self, input_ids, scores):
        written = (input_ids != self.pad_id).sum(1) - self.prompt_len  # [B]
        if self.ended is None:
            self.ended = torch.full_like(written, -1)
        due = (self.ends == written[:, None]).any(1) & (written > self.ended)  # [B] a sentence to end now
        self.ended = torch.where(due, written, self.ended)
        scores[:, self.banned] = -float("inf")
        scores = scores.masked_fill(due[:, None], -float("inf"))
        scores[:, self.end_class] = torch.where(due, 0.0, -float("inf"))
        self.calls += 1
        return scores


def run_header(device: torch.device) -> dict:
    """What a benchmark result must say about its run: date, command line, git commit (outside a git checkout,
    e.g. a copy on a GPU machine: $GIT_COMMIT), machine, versions."""
    import datetime
    import os
    import platform
    import subprocess
    import sys

    import transformers

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent)  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    status = git("status", "--porcelain")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}  # fmt: skip
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "device": str(device), "platform": platform.platform()}  # fmt: skip
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "git_commit": git("rev-parse", "HEAD") or os.environ.get("GIT_COMMIT"),  # a copy without .git: say it
        "git_dirty": None if status is None else bool(status),
        "machine": machine,
        "versions": versions,
    }
