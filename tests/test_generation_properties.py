"""Property-based tests of generate: random tiny backbones of each architecture, random prompts (lengths,
padding, empty rows, unfinished last sentences) and generation settings."""

import functools
import warnings

import pytest
import torch
from conftest import BACKBONE_CONFIGS, CONTINUATIONS, DOT, EOS, NEWLINE, PAD, left_pad, tiny_sllm
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import char_tokenizer, first_stop, never_stop, short_backbone_sllm

from modeling_sllm import SLLMForCausalLM

TOKENS = [DOT, NEWLINE, EOS, *CONTINUATIONS[:2], *range(10, 26)]  # sentence ends, glued pieces, words
SHORT_POSITIONS = 8  # the "short" variant: a GPT-2 / OPT backbone with 8 absolute positions
# Options generate refuses, each with the name its ValueError gives.
REFUSED = [
    ("num_beams", dict(num_beams=2)),
    ("penalty_alpha", dict(penalty_alpha=0.5, top_k=4)),
    ("cache_implementation", dict(cache_implementation="static")),
    ("output_hidden_states", dict(output_hidden_states=True)),
]


@functools.cache
def tiny_model(name: str, variant: str) -> SLLMForCausalLM:
    """A tiny SLLM, built once: "random" (untrained stop head), "never_stop", "window" (a decoder with a
    2-token window and 2 prefix vectors, never stopping), "rule" (rule ends, a 2-token window, never
    stopping), "shared" (the backbone as decoder, a 3-token window, never stopping), "short" (8 backbone positions, full sentences)."""
    if variant == "short":
        return short_backbone_sllm(name, positions=SHORT_POSITIONS, max_sentence_len=4)
    if variant == "window":
        return never_stop(
            tiny_sllm(name, max_sentence_len=6, decoder_window=2, decoder_prefix_vectors=2, sentence_pooling="mean")
        )
    if variant == "rule":
        return never_stop(tiny_sllm(name, max_sentence_len=6, decoder_window=2, sentence_end="rule"))
    if variant == "shared":
        return never_stop(tiny_sllm(name, max_sentence_len=6, decoder_window=3, decoder_shares_backbone=True))
    model = tiny_sllm(name, max_sentence_len=6)
    return never_stop(model) if variant == "never_stop" else model


@st.composite
def generation_cases(draw) -> tuple[str, str, list[torch.Tensor], dict, tuple[int, int] | None]:
    """A backbone, a model variant, prompt rows, the keyword arguments of a generate call, and where to
    take a stop string from in row 0's output (start, size), if any."""
    name = draw(st.sampled_from(sorted(BACKBONE_CONFIGS)))
    variants = ["random", "never_stop", "window", "rule", "shared"] + (["short"] if name in ("gpt2", "opt") else [])
    variant = draw(st.sampled_from(variants))
    rows = draw(st.lists(st.lists(st.sampled_from(TOKENS), max_size=10), min_size=1, max_size=3))
    kwargs = dict(suppress_tokens=[PAD])  # a generated pad would read as padding in the checks
    length = draw(st.sampled_from(["max_new_tokens", "max_length", "default"]))
    if length == "max_new_tokens":
        kwargs["max_new_tokens"] = draw(st.integers(1, 14))
    elif length == "max_length":
        kwargs["max_length"] = draw(st.integers(1, 22))
    kwargs["max_new_sentences"] = draw(st.one_of(st.none(), st.integers(0, 3)))
    kwargs["min_new_tokens"] = draw(st.one_of(st.none(), st.integers(0, 10)))
    kwargs["repetition_penalty"] = draw(st.sampled_from([1.0, 1.3]))
    if draw(st.booleans()):
        kwargs.update(do_sample=True, num_return_sequences=draw(st.integers(1, 2)))
    refused = draw(st.one_of(st.none(), st.sampled_from(REFUSED)))
    if refused is not None:
        kwargs.update(refused[1], refused_option=refused[0])
    stop = draw(st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(1, 2))))
    return name, variant, [torch.tensor(row, dtype=torch.long) for row in rows], kwargs, stop


def run(model: SLLMForCausalLM, ids: torch.LongTensor, mask: torch.LongTensor, seed: int, **kwargs):
    """generate with the random generator seeded, warnings (the default max_length's) silenced."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)


def new_token_budget(kwargs: dict, prompt_width: int) -> int:
    """The documented budget: max_new_tokens, else max_length minus the padded prompt, else 20."""
    if "max_new_tokens" in kwargs:
        return kwargs["max_new_tokens"]
    return kwargs["max_length"] - prompt_width if "max_length" in kwargs else 20


def check_caps(out, kwargs: dict, variant: str, prompt_width: int, prompt_sentences: int) -> None:
    """New tokens within the budget, min_new_tokens met, the backbone's cache within its sentences."""
    new = out.sequences[:, prompt_width:]  # [B * copies, N]
    written = (new != PAD).sum(1)  # pads are suppressed: only the padding after a row's end is pad
    budget = new_token_budget(kwargs, prompt_width)
    max_new_sentences = kwargs["max_new_sentences"]
    assert new.shape[1] <= (0 if max_new_sentences == 0 else budget)
    if kwargs["min_new_tokens"] and max_new_sentences is None and "stop_strings" not in kwargs:
        if variant != "short":  # nothing but the budget ends a row before min_new_tokens
            assert bool((written >= min(kwargs["min_new_tokens"], budget)).all())
    # The backbone reads the start state, the prompt's finished sentences and every new sentence but a
    # row's last (a continued prompt sentence is a new one, possibly without new tokens).
    new_sentences = budget + 1 if max_new_sentences is None else min(max_new_sentences, budget + 1)
    assert out.cache.get_seq_length() <= 1 + prompt_sentences + max(new_sentences - 1, 0)
    if variant == "short":
        assert out.cache.get_seq_length() <= SHORT_POSITIONS


@settings(max_examples=15, deadline=None)
@given(case=generation_cases(), seed=st.integers(0, 2**16))
def test_generate_terminates_within_its_caps_and_raises_only_documented_errors(case, seed):
    name, variant, rows, kwargs, stop = case
    model = tiny_model(name, variant)
    ids, mask = left_pad(rows)
    refused = kwargs.pop("refused_option", None)
    if refused is not None:
        with pytest.raises(ValueError, match=f"`{refused}`"):
            run(model, ids, mask, seed, **kwargs)
        return
    if "max_length" in kwargs and ids.shape[1] >= kwargs["max_length"]:
        with pytest.raises(ValueError, match="Input length of input_ids"):
            run(model, ids, mask, seed, **kwargs)
        return
    sentences = int(model.segment(ids, mask).num_sentences.max()) if ids.numel() else 0
    try:
        out = run(model, ids, mask, seed, **kwargs)
    except ValueError as error:  # documented: a prompt whose sentences do not fit the backbone's positions
        assert variant == "short" and sentences + 1 > SHORT_POSITIONS
        assert f"{SHORT_POSITIONS} positions" in str(error)
        return
    copies = kwargs.get("num_return_sequences", 1)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids.repeat_interleave(copies, 0))
    check_caps(out, kwargs, variant, ids.shape[1], sentences)
    if stop is not None:  # a row stops at the first token that completes a stop string
        tokenizer = char_tokenizer()
        free = [text.rstrip("~") for text in tokenizer.batch_decode(out.sequences[:, ids.shape[1] :])]
        kwargs.update(stop_strings=[free[0][stop[0] : stop[0] + stop[1]] or "z"], tokenizer=tokenizer)
        stopped = run(model, ids, mask, seed, **kwargs)
        check_caps(stopped, kwargs, variant, ids.shape[1], sentences)
        prompts = tokenizer.batch_decode(rows)
        for b, text in enumerate(tokenizer.batch_decode(stopped.sequences[:, ids.shape[1] :])):
            prompt, text, stop_string = prompts[b // copies], text.rstrip("~"), kwargs["stop_strings"][0]
            assert first_stop(prompt, text, stop_string) == text
            if not kwargs.get("do_sample"):  # the same text, cut there
                assert text == first_stop(prompt, free[b], stop_string)
        out = stopped

    recomputed = run(model, ids, mask, seed, use_cache=False, **kwargs)
    assert torch.equal(out.sequences, recomputed.sequences)
    if not kwargs.get("do_sample"):  # a batch equals its rows generated alone, with the same budget
        budget = new_token_budget(kwargs, ids.shape[1])
        alone_kwargs = {k: v for k, v in kwargs.items() if k != "max_length"} | {"max_new_tokens": budget}
        for b, prompt in enumerate(rows):
            alone = run(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long), seed, **alone_kwargs)
            alone_new, new = alone.sequences[0, len(prompt) :], out.sequences[b, ids.shape[1] :]
            assert torch.equal(new[: len(alone_new)], alone_new)
            assert bool((new[len(alone_new) :] == PAD).all())
