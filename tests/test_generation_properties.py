"""Property-based tests of generate: random tiny backbones of each architecture, random prompts (lengths,
padding, empty rows, unfinished last sentences) and generation settings."""

import functools
import warnings

import pytest
import torch
from conftest import BACKBONE_CONFIGS, CONTINUATIONS, DOT, EOS, NEWLINE, PAD, left_pad, tiny_backbone, tiny_sllm
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_generation import char_tokenizer, first_stop, never_stop, short_backbone_sllm

from modeling_sllm import SLLMForCausalLM

TOKENS = [DOT, NEWLINE, EOS, *CONTINUATIONS[:2], *range(10, 26)]  # sentence ends, glued pieces, words
SHORT_POSITIONS = 8  # the "short" variant: a GPT-2 / OPT backbone with 8 absolute positions
# Options generate refuses, each with the name its ValueError gives.
REFUSED = [
    ("num_beams", dict(num_beams=2)),
    ("penalty_alpha", dict(penalty_alpha=0.5, top_k=4)),
    ("cache_implementation", dict(cache_implementation="offloaded")),
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


@functools.cache
def plain_llm():
    """A plain Transformers Llama: the reference for how many new tokens a generate call may write."""
    return tiny_backbone("llama")


@functools.cache
def transformers_budget(length: tuple, prompt_width: int) -> int:
    """New tokens Transformers' own generate writes with these length settings (`length`: the
    max_new_tokens / max_length items, or none) after a prompt `prompt_width` wide, when nothing
    ends the text earlier."""
    kwargs = dict(length)
    if prompt_width == 0:  # Transformers needs a token to start from: one more, and one more allowed
        prompt_width = 1
        if "max_length" in kwargs:
            kwargs["max_length"] += 1
    ids = torch.full((1, prompt_width), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = plain_llm().generate(ids, attention_mask=torch.ones_like(ids), suppress_tokens=[EOS], **kwargs)
    return out.shape[1] - prompt_width


def new_token_budget(kwargs: dict, prompt_width: int) -> int:
    """The new tokens generate may write with these kwargs: as many as Transformers' own generate."""
    length = tuple((name, kwargs[name]) for name in ("max_new_tokens", "max_length") if name in kwargs)
    return transformers_budget(length, prompt_width)


def backbone_entries(model, variant: str, prompt: torch.Tensor, new: torch.Tensor, kwargs: dict, budget: int):
    """The backbone entries one row's generate call leaves in the cache, (fewest, most): the start
    state and each sentence of its text (prompt + new tokens) but the last, which nothing reads,
    unless the stop head ended the text (it read the last sentence's state to decide). The sentences
    are those of the text under the model's own segmentation ("short" writes max_sentence_len-token
    sentences, its ends are never learned). Exact, except after a "." that ended a sentence: a glued
    token there may open the next sentence in generate, which segmentation would join to the ".", so
    each such spot may add one."""
    max_len, glued = model.config.max_sentence_len, torch.tensor(CONTINUATIONS)
    lengths = model.segment(prompt[None]).lengths[0]
    lengths = lengths[lengths > 0]
    open_len = 0  # the prompt's last sentence is continued unless it surely ended (a hard end, or full); after
    if len(prompt) and prompt[-1].item() not in (NEWLINE, EOS) and lengths[-1] < max_len:  # "." the decoder decides
        open_len = int(lengths[-1])
    finished = len(lengths) - (open_len > 0)  # prompt sentences read before the first new token
    if kwargs["max_new_sentences"] == 0:
        return 1 + finished, 1 + finished
    text = torch.cat([prompt, new])
    if variant == "short":
        sentences, spots = finished + -(-(open_len + len(new)) // max_len), 0
    else:
        sentences = int(model.segment(text[None]).num_sentences[0])
        after_dot = (text[:-1] == DOT) & torch.isin(text[1:], glued)
        spots = int(after_dot[max(len(prompt) - 1, 0) :].sum())
    # a prompt's unfinished "." sentence that the decoder ends at once (no token, or a first one that does not
    # glue) is not a new sentence: it counts nothing toward max_new_sentences
    glued_first = len(new) > 0 and new[0].item() in CONTINUATIONS
    closed_at_once = bool(open_len) and prompt[-1].item() == DOT and not glued_first
    stop_strings = kwargs.get("stop_strings")
    tokenizer = kwargs.get("tokenizer")
    entries = []
    for count in range(sentences, sentences + spots + 1):
        written_to_the_end = (
            variant != "random"  # the others' stop heads never fire
            or (len(new) and new[-1].item() == EOS)
            or len(new) == budget
            or count - finished - closed_at_once == kwargs["max_new_sentences"]
            or (stop_strings is not None and len(new) and tokenizer.decode(text).endswith(stop_strings[0]))
        )
        entries.append(1 + count - bool(written_to_the_end))
    return min(entries), max(entries)


def check_caps(model, out, kwargs: dict, variant: str, rows: list[torch.Tensor], prompt_width: int) -> None:
    """New tokens within Transformers' budget, min_new_tokens met, the backbone's cache exactly the
    sentences it read."""
    new = out.sequences[:, prompt_width:]  # [B * copies, N]
    written = (new != PAD).sum(1)  # pads are suppressed: only the padding after a row's end is pad
    budget = new_token_budget(kwargs, prompt_width)
    max_new_sentences = kwargs["max_new_sentences"]
    assert new.shape[1] <= (0 if max_new_sentences == 0 else budget)
    if kwargs["min_new_tokens"] and max_new_sentences is None and "stop_strings" not in kwargs:
        if variant != "short":  # nothing but the budget ends a row before min_new_tokens
            assert bool((written >= min(kwargs["min_new_tokens"], budget)).all())
    if max_new_sentences is None and "stop_strings" not in kwargs and variant not in ("random", "short"):
        for b, count in enumerate(written.tolist()):  # nothing but eos ends a row before its budget
            assert count == budget or (count and new[b, count - 1].item() == EOS)
    # One cache for the batch, left padded: as long as the row with the most entries needs.
    copies = len(out.sequences) // len(rows)
    entries = [
        backbone_entries(model, variant, rows[b // copies], new[b, : int(written[b])], kwargs, budget)
        for b in range(len(out.sequences))
    ]
    assert max(low for low, _ in entries) <= out.cache.get_seq_length() <= max(high for _, high in entries)
    if variant == "short":
        assert out.cache.get_seq_length() <= SHORT_POSITIONS


@settings(max_examples=15, deadline=None)
@given(case=generation_cases(), seed=st.integers(0, 2**16))
@example(  # found here: a prompt ending in "." is continued (issue 32), so no sentence is read before the first
    case=("gpt2", "random", [torch.tensor([DOT])],  # new token, and max_new_sentences=0 leaves only the start state
          dict(suppress_tokens=[PAD], max_new_tokens=1, max_new_sentences=0, min_new_tokens=None,
               repetition_penalty=1.0), None),  # fmt: skip
    seed=0,
)
@example(  # found in CI: a prompt's "." that the decoder ends at once is no new sentence, so max_new_sentences=1
    case=("gpt2", "random", [torch.tensor([DOT])],  # still lets the stop head read it and end the text
          dict(suppress_tokens=[PAD], max_new_tokens=1, max_new_sentences=1, min_new_tokens=None,
               repetition_penalty=1.0), None),  # fmt: skip
    seed=0,
)
@example(  # found in CI: a row done early fed placeholders at ever larger positions, past GPT-2's 8
    case=(
        "gpt2",
        "short",
        [torch.tensor([], dtype=torch.long)],
        dict(
            suppress_tokens=[PAD],
            max_new_sentences=None,
            min_new_tokens=None,
            repetition_penalty=1.0,
            do_sample=True,
            num_return_sequences=2,
        ),
        (0, 1),
    ),
    seed=0,
)
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
    check_caps(model, out, kwargs, variant, rows, ids.shape[1])
    if stop is not None:  # a row stops at the first token that completes a stop string
        tokenizer = char_tokenizer()
        free = [text.rstrip("~") for text in tokenizer.batch_decode(out.sequences[:, ids.shape[1] :])]
        kwargs.update(stop_strings=[free[0][stop[0] : stop[0] + stop[1]] or "z"], tokenizer=tokenizer)
        stopped = run(model, ids, mask, seed, **kwargs)
        check_caps(model, stopped, kwargs, variant, rows, ids.shape[1])
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
