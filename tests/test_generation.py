"""Sentence-by-sentence generate: caching, batching, sampling, limits, streaming, stopping,
unfinished prompt sentences, refused options."""

import string
import traceback

import pytest
import torch
from conftest import BOUNDARIES, DOT, EOS, NEWLINE, PAD, VOCAB, decoder_class_logits, left_pad, tiny_sllm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.nn.utils.rnn import pad_sequence
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LogitsProcessor,
    LogitsProcessorList,
    OPTConfig,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from modeling_sllm import SLLMForCausalLM, cache_nbytes
from modeling_sllm.sentence_loop import SentenceLoop

# Rows 0 and 2 end mid-sentence (their last sentence is continued), row 1 at a sentence end.
PROMPTS = [torch.tensor([10, 11, DOT, 12, 13]), torch.tensor([20, DOT]), torch.tensor([30, 31, 32, DOT, 33, DOT, 34])]
FINISHED_PROMPTS = [torch.tensor([10, 11, DOT]), torch.tensor([20, DOT]), torch.tensor([30, 31, 32, DOT, 33, DOT])]


def never_stop(model: SLLMForCausalLM) -> SLLMForCausalLM:
    """Make the untrained model's stop head never fire (a worst case for termination)."""
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


def never_end_sentences(model: SLLMForCausalLM) -> SLLMForCausalLM:
    """Make the decoder (with a learned end) never close a sentence itself: sentences run to max_sentence_len."""
    with torch.no_grad():
        model.sentence_decoder.end_head.bias.fill_(-1e4)
    return model


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of the tiny vocabulary in which every token is one character (for stop_strings)."""
    chars = ["~", ".", "\n", "$", "^", *"56789", *string.ascii_letters, "0", "1"]  # PAD, DOT, NEWLINE, EOS, BOS, ...
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="~"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="~", eos_token="$", bos_token="^")


def first_stop(prompt: str, text: str, stop: str) -> str:
    """`text` cut after the first token (one character each) that completes `stop`, the prompt included."""
    ends = [i for i in range(1, len(text) + 1) if (prompt + text[:i]).endswith(stop)]
    return text[: ends[0]] if ends else text


class Recorder(BaseStreamer):
    """Records what generate streams."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def batch():
    return left_pad(PROMPTS)


@pytest.mark.parametrize("backbone_name", ["llama", "gpt2", "opt", "mistral"])
def test_cached_equals_recomputed(backbone_name):
    model = never_stop(tiny_sllm(backbone_name))
    ids, mask = batch()
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=40)
    recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=40, use_cache=False)
    assert cached.shape[1] > ids.shape[1] + 8
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("backbone_name", ["llama", "qwen2", "gpt2"])
def test_left_padded_batch_equals_each_row_alone(backbone_name):
    model = never_stop(tiny_sllm(backbone_name))
    with torch.no_grad():  # rows end at different times: row 1 writes eos early
        model.get_input_embeddings().weight[EOS] *= 0
    ids, mask = batch()
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=30)
    for b, prompt in enumerate(PROMPTS):
        single = model.generate(prompt[None], max_new_tokens=30)[0]
        new = single[len(prompt) :]
        row_new = batched[b, ids.shape[1] :]
        assert torch.equal(row_new[: len(new)], new)
        assert (row_new[len(new) :] == PAD).all()


class RowSentenceLengths(LogitsProcessor):
    """Row b writes sentences of exactly lengths[b] tokens (never pad or eos)."""

    def __init__(self, prompt_lens: list[int], lengths: list[int], end_class: int):
        self.prompt_lens, self.lengths, self.end_class = prompt_lens, lengths, end_class
        self.ended = [0] * len(lengths)  # sentences each row has ended

    def __call__(self, input_ids, scores):
        scores[:, [PAD, EOS, NEWLINE]] = -float("inf")  # a newline would end a rule-ended sentence early
        for b, length in enumerate(self.lengths):
            written = int((input_ids[b] != PAD).sum()) - self.prompt_lens[b]
            if written > 0 and written % length == 0 and self.ended[b] < written // length:
                scores[b] = -float("inf")
                scores[b, self.end_class] = 0.0
                self.ended[b] += 1
            else:
                scores[b, self.end_class] = -float("inf")
        return scores


def test_rows_write_sentences_of_different_lengths_without_waiting_for_each_other():
    model = never_stop(tiny_sllm())
    prompts = [FINISHED_PROMPTS[0], FINISHED_PROMPTS[1], FINISHED_PROMPTS[2], FINISHED_PROMPTS[0]]
    ids, mask = left_pad(prompts)
    lengths = [2, 2, 2, 6]

    def run(rows):
        forcing = RowSentenceLengths([len(prompts[b]) for b in rows], [lengths[b] for b in rows], VOCAB)
        out = model.generate(
            ids[rows], attention_mask=mask[rows], max_new_tokens=24, logits_processor=LogitsProcessorList([forcing]),
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        return out.sequences[:, ids.shape[1] :], len(out.scores)

    batched, decoder_steps = run([0, 1, 2, 3])
    assert (batched != PAD).all()  # 24 new tokens in every row
    for b in range(4):
        assert torch.equal(batched[b], run([b])[0][0])
    # Alone, a row with 2-token sentences takes 12 x 3 decoder steps (2 tokens, then the end class).
    # Rounds in lockstep would take 4 x 7 + 8 x 3 = 52; here the short rows go on without the long one.
    assert decoder_steps < 45


def test_limits_hold_on_an_untrained_model():
    model = never_end_sentences(never_stop(tiny_sllm(max_sentence_len=5, sentence_end="learned")))
    ids, mask = batch()
    for limit in (1, 7, 23):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=limit, suppress_tokens=[EOS], return_dict_in_generate=True
        )  # no eos: only the limits end a row
        assert out.sequences.shape[1] == ids.shape[1] + limit
        # Row 2 has the most backbone entries: the start state, 2 finished prompt sentences, then its
        # unfinished one ([34]) continued by the new tokens, cut at max_sentence_len: ceil((1 + limit) / 5)
        # sentences, all but the last encoded.
        assert out.cache.get_seq_length() == 1 + 2 + -(-(1 + limit) // 5) - 1


@pytest.mark.parametrize("prompt", [FINISHED_PROMPTS[2], PROMPTS[2]], ids=["finished", "unfinished"])
def test_backbone_cache_holds_one_entry_per_sentence(prompt):
    model = never_stop(tiny_sllm())
    recorder = Recorder()
    out = model.generate(
        prompt[None], max_new_tokens=200, max_new_sentences=4, suppress_tokens=[EOS], streamer=recorder,
        return_dict_in_generate=True,
    )  # fmt: skip
    # start state + 2 finished prompt sentences + 4 new sentences but the last (nothing reads its state);
    # a continued prompt sentence is one of the 4, encoded whole once it is finished.
    assert out.cache.get_seq_length() == 1 + 2 + 3
    assert len(recorder.puts) == 1 + 4  # the prompt, then one put per sentence
    layer = out.cache.layers[0]
    config = model.config.text_config
    per_entry = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert cache_nbytes(out.cache) == config.num_hidden_layers * per_entry * 6
    assert layer.keys.shape[-2] == 6


def test_empty_and_all_padding_prompts_start_from_the_start_state():
    model = never_stop(tiny_sllm())
    alone = model.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=12)
    assert alone.shape == (1, 12)
    ids, mask = left_pad([torch.tensor([], dtype=torch.long), torch.tensor([20, DOT])])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out[0, ids.shape[1] :], alone[0])


def test_sampling_is_seeded_and_knobs_change_the_distribution():
    model = never_stop(tiny_sllm())
    ids, mask = batch()

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, **kwargs)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, top_p=1e-6), greedy)

    def first_scores(**kwargs):
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=True, top_k=0,
                             output_scores=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
        return out.scores[0]

    assert torch.allclose(first_scores(temperature=0.25), first_scores(temperature=1.0) / 0.25)
    out = model.generate(
        ids[:1], max_new_tokens=8, do_sample=True, top_k=3, output_scores=True, return_dict_in_generate=True
    )
    assert all((torch.isfinite(s[0]).sum() <= 3) for s in out.scores)


@pytest.mark.parametrize("cache", ["dynamic", "static", "recompute"])
def test_eos_and_empty_sentences_are_masked_before_the_processors(cache):
    """Before min_new_tokens each of the row's eos ids, and at a sentence's start its end, are masked (-inf) before
    the processors see the logits: a processor that only adds to their logits cannot pick them, on every decoder
    path (the static one compiled)."""

    class Prefer(LogitsProcessor):
        def __init__(self, column: int):
            self.column = column

        def __call__(self, input_ids, scores):
            return scores + 100.0 * (torch.arange(scores.shape[1]) == self.column % scores.shape[1])  # -inf stays

    model = tiny_sllm()
    prompt = FINISHED_PROMPTS[0][None]
    options = {"use_cache": False} if cache == "recompute" else {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(prompt, max_new_tokens=20, min_new_tokens=6, eos_token_id=[EOS, 7],
                         logits_processor=LogitsProcessorList([Prefer(EOS)]), **options)  # fmt: skip
    new = out[0, prompt.shape[1] :].tolist()
    assert new[6:] == [EOS] and EOS not in new[:6], new
    learned = tiny_sllm(sentence_end="learned")  # it may end a sentence after any token, not only the rule's
    out = learned.generate(prompt, max_new_tokens=6, min_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                           logits_processor=LogitsProcessorList([Prefer(-1)]), **options)  # fmt: skip
    assert out.sequences.shape[1] == prompt.shape[1] + 6
    # the boosted end is chosen wherever it is allowed, so a step that allows it is followed by a sentence start
    allowed = [bool(torch.isfinite(step[0, -1])) for step in out.scores]
    assert sum(allowed) >= 3 and not any(a and b for a, b in zip(allowed, allowed[1:])), allowed


def test_min_new_tokens_and_eos():
    model = tiny_sllm()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([-50.0, 50.0]))  # wants to stop at once
    prompt = FINISHED_PROMPTS[0][None]
    assert model.generate(prompt, max_new_tokens=20).shape[1] == prompt.shape[1]
    assert model.generate(prompt, max_new_tokens=20, min_new_tokens=6).shape[1] >= prompt.shape[1] + 6
    assert model.generate(prompt, max_new_tokens=20, min_length=prompt.shape[1] + 6).shape[1] >= prompt.shape[1] + 6
    # the text ends only after a sentence: an unfinished prompt sentence is finished first
    assert model.generate(PROMPTS[0][None], max_new_tokens=20).shape[1] > PROMPTS[0].shape[0]
    prompt = PROMPTS[0][None]

    class ForceEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] >= prompt.shape[1] + 3:
                scores[:, :] = -float("inf")
                scores[:, EOS] = 0
            return scores

    never_stop(model)
    out = model.generate(prompt, max_new_tokens=20, logits_processor=LogitsProcessorList([ForceEos()]))
    assert out[0, -1].item() == EOS and out.shape[1] == prompt.shape[1] + 4


class AtLength(StoppingCriteria):
    """Stops every row once the batch is `length` columns wide."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_user_stopping_criteria_cut_the_row_mid_sentence():
    model = never_end_sentences(never_stop(tiny_sllm(sentence_end="learned")))  # sentences of max_sentence_len = 8 tokens
    prompt = PROMPTS[0][None]  # [10 11 .] [12 13 ...: the continued sentence takes 6 new tokens
    free = model.generate(prompt, max_new_tokens=60)
    stopped = model.generate(
        prompt, max_new_tokens=60, stopping_criteria=StoppingCriteriaList([AtLength(12)]), return_dict_in_generate=True
    )
    # checked after every token: cut at 12, 1 token into the second new sentence, which the backbone never reads
    assert stopped.sequences.shape[1] == 12
    assert torch.equal(stopped.sequences[0], free[0, :12])
    assert stopped.cache.get_seq_length() == 1 + 1 + 1  # start, [10 11 .], the continued sentence


def test_stop_strings_cut_the_row_where_they_match():
    model = never_end_sentences(never_stop(tiny_sllm(sentence_end="learned")))  # sentences of 8 tokens
    tokenizer = char_tokenizer()  # one character per token: "~" is the pad
    ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=40, suppress_tokens=[PAD])
    free = [text.rstrip("~") for text in tokenizer.batch_decode(model.generate(ids, **kwargs)[:, ids.shape[1] :])]
    stop = free[0][9:11]  # written by row 0 in its second new sentence (its first continues the prompt's)
    out = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, **kwargs)
    for b, prompt in enumerate(tokenizer.batch_decode(PROMPTS)):
        assert tokenizer.decode(out[b, ids.shape[1] :]).rstrip("~") == first_stop(prompt, free[b], stop)
    assert len(tokenizer.decode(out[0, ids.shape[1] :]).rstrip("~")) <= 11


def test_max_time_is_checked_after_every_token():
    model = never_stop(tiny_sllm())
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, max_time=0.0)
    assert out.shape[1] == ids.shape[1] + 1  # every row wrote its first token, then the time was up


def test_streamer_gets_each_sentence_as_it_is_written():
    model = never_stop(tiny_sllm())
    recorder = Recorder()
    prompt = FINISHED_PROMPTS[0][None]
    out = model.generate(prompt, max_new_tokens=30, max_new_sentences=3, streamer=recorder)
    assert recorder.ended and recorder.puts[0] == prompt[0].tolist()
    assert len(recorder.puts) == 4  # the prompt, then one put per sentence
    assert sum(recorder.puts[1:], []) == out[0, prompt.shape[1] :].tolist()


def test_max_new_sentences_persists(tmp_path):
    model = never_stop(tiny_sllm())
    model.generation_config.max_new_sentences = 2
    model.save_pretrained(tmp_path)
    loaded = SLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.max_new_sentences == 2
    prompt = PROMPTS[1][None]
    out = loaded.generate(prompt, max_new_tokens=100, return_dict_in_generate=True)
    assert out.cache.get_seq_length() == 1 + 1 + 1


def test_generate_through_peft():
    """peft_model.generate runs the wrapper's generate with the adapter active: it equals the merged
    model's output and differs from the base model's (lora_B perturbed, else LoRA is a no-op)."""
    from peft import LoraConfig, get_peft_model

    model = never_stop(tiny_sllm())
    prompt = PROMPTS[0][None]
    base = model.generate(prompt, max_new_tokens=20)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r"llm\..*_proj", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1.0)
    adapted = peft_model.generate(input_ids=prompt, max_new_tokens=20)
    merged = peft_model.merge_and_unload().generate(prompt, max_new_tokens=20)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, base)


@pytest.mark.smollm2
def test_text_streamers_on_real_smollm2(smollm2):
    from threading import Thread

    from transformers import TextIteratorStreamer

    llm, tokenizer = smollm2
    model = never_stop(SLLMForCausalLM.from_base_model(llm, tokenizer).eval())
    prompt = tokenizer(
        "The os module provides a portable way of using operating system functionality.", return_tensors="pt"
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(**prompt, max_new_tokens=24, max_new_sentences=2, streamer=streamer)
    thread = Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    chunks = list(streamer)
    thread.join()
    out = model.generate(**prompt, max_new_tokens=24, max_new_sentences=2)
    assert "".join(chunks) == tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    assert len(chunks) >= 1


@pytest.mark.smollm2
def test_text_generation_pipeline(base_folder, tmp_path):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = never_stop(SLLMForCausalLM.from_base_model(base_folder, tokenizer).eval())
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), trust_remote_code=True)
    prompt = "The json module can serialize Python objects. It is"
    text = generator(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0]["generated_text"]
    expected = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=10, min_new_tokens=10)
    assert text.startswith(prompt) and text == tokenizer.decode(expected[0], skip_special_tokens=True)


def teacher_forced_classes(
    model: SLLMForCausalLM, context: torch.Tensor, before: list[int], sentence: list[int], logits: bool = False
):
    """The decoder's argmax class (eos excluded) at every position of `sentence`, decoded teacher-forced
    from the backbone state context [H] and the decoder_window tokens of `before` (the text before it):
    [len(sentence) + 1] classes, the k-th predicting token k (the last: the sentence end); or their
    class logits [len(sentence) + 1, V+1] with `logits=True`."""
    decoder, embed = model.sentence_decoder, model.get_input_embeddings()
    window = before[-model.config.decoder_window :] if model.config.decoder_window else []
    window_embeds = embed(torch.tensor([window], dtype=torch.long))  # [1, W, H]
    states = decoder(
        decoder.condition(context[None]), embed(torch.tensor([sentence])), window_embeds,
        torch.ones(1, len(window), dtype=torch.bool), layers=model.decoder_layers(),
    ).last_hidden_state[0]  # [L+1, H]  # fmt: skip
    class_logits = decoder_class_logits(model, states, torch.tensor(sentence))  # [L+1, V+1]
    if logits:
        return class_logits
    return class_logits.index_fill(1, torch.tensor([EOS]), -float("inf")).argmax(-1).tolist()


@pytest.mark.parametrize(
    "backbone_name, decoder",
    [
        ("llama", {}),
        ("gpt2", dict(sentence_end="learned")),
        ("gpt2", dict(decoder_window=3, sentence_pooling="mean")),  # this untrained decoder reads its window
        ("qwen2", dict(decoder_prefix_vectors=3)),
        ("opt", dict(decoder_shares_backbone=True)),
        ("llama", dict(sentence_end="rule")),
        ("opt", dict(decoder_shares_backbone=True, decoder_window=3, sentence_end="rule")),
    ],
)
def test_a_prompt_cut_mid_sentence_is_continued_as_the_teacher_forced_decoder_would(backbone_name, decoder):
    model = never_stop(tiny_sllm(backbone_name, **decoder))
    with torch.no_grad():
        if model.config.sentence_end == "learned":
            model.sentence_decoder.end_head.bias.add_(0.1)  # some sentences end before max_sentence_len
        prefix_proj = model.sentence_decoder.prefix_proj
        if prefix_proj is not None:  # prefix vectors that are not m copies of the context
            noise = torch.randn(prefix_proj.weight.shape, generator=torch.Generator().manual_seed(0))
            prefix_proj.weight.add_(0.3 * noise)
    finished, unfinished = [10, 11, DOT], [12, 13]
    prompt = torch.tensor([finished + unfinished])
    recorder = Recorder()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=30, max_new_sentences=2, suppress_tokens=[EOS], streamer=recorder)
        first, second = recorder.puts[1:]  # the new tokens of each sentence (the prompt's are not written again)
        assert len(first) >= 2
        # Sentence 1 is decoded from the backbone state before it, as forward computes it, its prompt
        # tokens fed as its first tokens: each new token, then the sentence end, is the argmax.
        context = model(prompt).sentence_states[0, 1]  # [H]: has read the start state and sentence 0
        expected = first + ([VOCAB] if len(unfinished + first) < model.config.max_sentence_len else [])  # full: no end
        classes = teacher_forced_classes(model, context, finished, unfinished + first)
        assert classes[len(unfinished) : len(unfinished) + len(expected)] == expected
        if model.config.decoder_window:  # the window matters: a shorter one would make the decoder write otherwise
            shorter = teacher_forced_classes(model, context, finished[1:], unfinished + first, logits=True)
            assert not torch.allclose(shorter, teacher_forced_classes(model, context, finished, unfinished + first, True))
        # Then sentence 1 is encoded whole and the backbone reads it.
        sentences = pad_sequence([torch.tensor(finished), torch.tensor(unfinished + first)], batch_first=True)
        vectors = model.encode_sentences(sentences, torch.tensor([len(finished), len(unfinished + first)]))  # [2, H]
        inputs = torch.cat([model.start_states(1), vectors[None]], 1)  # [1, 3, H]
        context = model.run_backbone(inputs, torch.ones(1, 3, dtype=torch.long)).last_hidden_state[0, -1]
        assert teacher_forced_classes(model, context, finished + unfinished + first, second)[: len(second)] == second


def test_rule_ends_close_a_sentence_after_a_hard_end_without_a_decoder_step():
    """sentence_end="rule": after a newline the sentence is over (certain), so no decoder step is spent on
    its end; after "." the decoder still chooses between a glued token and the end, the prompt's "." too."""
    model = never_stop(tiny_sllm(sentence_end="rule"))
    prompt = torch.tensor([[10, 11, DOT]])
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=6, max_new_sentences=3, sequence_bias={(NEWLINE,): 100.0},
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.sequences[0, 3:].tolist() == [NEWLINE] * 3  # three one-token sentences
    assert len(out.scores) == 4  # the prompt's end, then one decoder step each: none for the certain ends
    assert bool(torch.isfinite(out.scores[0][0, VOCAB])) and out.scores[0][0, NEWLINE].isinf()  # glued or end
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=6, max_new_sentences=2, sequence_bias={(DOT,): 100.0},
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.sequences[0, 3:].tolist() == [DOT, DOT]  # after "." nothing but a glued token is a token
    assert len(out.scores) == 5 and all(bool(torch.isfinite(step[0, VOCAB])) for step in out.scores[::2])


def test_rows_cut_at_different_places_batched_equal_each_row_alone():
    model = never_stop(tiny_sllm())
    prompts = [
        torch.tensor([10, 11, DOT, 12, 13]),  # 2 tokens into sentence 1
        torch.tensor([20, 21, 22, 23, 24, 25, 26]),  # 7 of max_sentence_len 8 tokens
        torch.tensor([30, DOT]),  # at a sentence end: a new sentence starts
        torch.tensor([40]),
        torch.tensor([], dtype=torch.long),
    ]
    ids, mask = left_pad(prompts)
    for use_cache in (True, False):
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=use_cache)
        for b, prompt in enumerate(prompts):
            new = model.generate(prompt[None], max_new_tokens=20, use_cache=use_cache)[0, len(prompt) :]
            assert torch.equal(batched[b, ids.shape[1] :][: len(new)], new)
            assert (batched[b, ids.shape[1] + len(new) :] == PAD).all()


def test_the_streamer_and_max_new_tokens_count_only_new_tokens():
    model = never_end_sentences(never_stop(tiny_sllm(sentence_end="learned")))  # sentences of max_sentence_len = 8 tokens
    prompt = PROMPTS[0][None]  # [10 11 .] [12 13
    recorder = Recorder()
    out = model.generate(prompt, max_new_tokens=10, streamer=recorder)
    assert out.shape[1] == prompt.shape[1] + 10
    # the continued sentence is 2 prompt tokens + 6 new ones; then 4 tokens of the next sentence
    assert [len(put) for put in recorder.puts] == [5, 6, 4]
    assert sum(recorder.puts[1:], []) == out[0, prompt.shape[1] :].tolist()


def test_a_prompt_piece_of_max_sentence_len_tokens_is_a_finished_sentence():
    model = never_end_sentences(never_stop(tiny_sllm(sentence_end="learned")))
    for length, first_sentence in ((7, 1), (8, 8)):  # max_sentence_len = 8
        recorder = Recorder()
        model.generate(torch.arange(20, 20 + length)[None], max_new_tokens=9, streamer=recorder)
        assert len(recorder.puts[1]) == first_sentence


def test_without_max_new_tokens_the_budget_is_as_in_transformers():
    model = never_stop(tiny_sllm())
    prompt = torch.arange(10, 35)[None]  # 25 tokens, longer than the default max_length (20)
    with pytest.warns(UserWarning, match="default `max_length` \\(=20\\)"):
        out = model.generate(prompt, min_new_tokens=20)  # min_new_tokens: no early eos
    assert out.shape[1] == 25 + 20  # 20 new tokens
    assert model.generate(prompt, max_length=30, min_new_tokens=5).shape[1] == 30
    with pytest.raises(ValueError, match="Input length of input_ids is 25, but `max_length` is set to 10"):
        model.generate(prompt, max_length=10)


@pytest.mark.parametrize(
    "option, kwargs",
    [
        ("num_beams", dict(num_beams=2)),
        ("num_beam_groups", dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0)),
        ("penalty_alpha", dict(penalty_alpha=0.6, top_k=4)),
        ("force_words_ids", dict(num_beams=2, force_words_ids=[[10]])),
        ("dola_layers", dict(dola_layers="low")),
        ("prompt_lookup_num_tokens", dict(prompt_lookup_num_tokens=3)),
        ("assistant_model", None),
        ("cache_implementation", dict(cache_implementation="offloaded")),
        ("guidance_scale", dict(guidance_scale=1.5)),
        ("token_healing", dict(token_healing=True)),
        ("output_attentions", dict(output_attentions=True, return_dict_in_generate=True)),
        ("output_hidden_states", dict(output_hidden_states=True, return_dict_in_generate=True)),
        ("prefix_allowed_tokens_fn", dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [10])),
        ("num_return_sequences", dict(num_return_sequences=2)),  # greedy: refused by Transformers' own check
    ],
)
def test_modes_the_sentence_loop_does_not_implement_are_refused_by_name(option, kwargs):
    model = tiny_sllm()
    kwargs = dict(assistant_model=tiny_sllm(seed=1)) if kwargs is None else kwargs
    with pytest.raises(ValueError, match=f"`{option}`"):
        model.generate(PROMPTS[0][None], max_new_tokens=4, **kwargs)


def test_num_return_sequences_samples_several_continuations_per_prompt():
    model = never_stop(tiny_sllm())
    ids, mask = batch()
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 3 * len(PROMPTS)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(3, 0))
    assert len({tuple(row) for row in out[:3, ids.shape[1] :].tolist()}) > 1  # row 0's three samples differ
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    alike = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(alike, greedy.repeat_interleave(2, 0))


def test_scores_are_processed_and_logits_raw_per_decoder_step():
    model = never_stop(tiny_sllm())
    ids, mask = batch()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, temperature=0.5, top_k=0, do_sample=True,
        output_scores=True, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert len(out.scores) == len(out.logits) > 0
    for scores, logits in zip(out.scores, out.logits):
        assert scores.shape == logits.shape == (len(PROMPTS), VOCAB + 1)
        finite = torch.isfinite(scores)
        assert torch.allclose(scores[finite], logits[finite] / 0.5)
    # greedy: each step's chosen class is the argmax of its scores; row 0's first step continues [12 13
    out = model.generate(PROMPTS[0][None], max_new_tokens=10, output_scores=True, return_dict_in_generate=True)
    chosen = [int(step[0].argmax()) for step in out.scores]
    assert [c for c in chosen if c != VOCAB] == out.sequences[0, PROMPTS[0].shape[0] :].tolist()
    assert out.logits is None


def short_backbone_sllm(name: str, positions: int, max_sentence_len: int) -> SLLMForCausalLM:
    """A tiny SLLM on a GPT-2 or OPT backbone with `positions` absolute positions."""
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=positions)
    else:
        config = OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            word_embed_proj_dim=32, max_position_embeddings=positions,
        )  # fmt: skip
    config.pad_token_id, config.eos_token_id = PAD, EOS
    llm = AutoModelForCausalLM.from_config(config)
    model = SLLMForCausalLM.from_base_model(
        llm, **BOUNDARIES, max_sentence_len=max_sentence_len, sentence_dropout=0.0, sentence_end="learned"
    )
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    return never_end_sentences(never_stop(model.eval()))


@pytest.mark.parametrize("backbone_name", ["gpt2", "opt"])
def test_generation_stops_cleanly_at_the_backbone_positions(backbone_name):
    model = short_backbone_sllm(backbone_name, positions=6, max_sentence_len=4)
    prompt = torch.tensor([[10, 11, DOT, 20, DOT]])  # 2 sentences: backbone positions 0-2 with the start state
    for use_cache in (True, False):
        out = model.generate(
            prompt, max_new_tokens=100, suppress_tokens=[EOS], use_cache=use_cache, return_dict_in_generate=True
        )
        # the prompt's last sentence goes on to 4 tokens (position 2); 3 new sentences fill positions 3-5; a
        # 4th is written from the state at position 5, not read
        assert out.sequences.shape[1] == prompt.shape[1] + 2 + 4 * 4
        if use_cache:
            assert out.cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="6 positions"):
        model.generate(torch.tensor([[10, NEWLINE] * 6]), max_new_tokens=4)  # 6 finished sentences + the start


def test_token_ids_outside_the_vocabulary_are_refused_before_generating():
    model = tiny_sllm()
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(torch.tensor([[10, 11, bad, DOT]]), max_new_tokens=4)


def test_peak_cache_bytes_count_the_decoder_cache_beside_the_sentence_cache():
    """peak_cache_bytes holds every cache of the call: the backbone's sentence cache and the decoder's,
    which holds at least one whole sentence's layout (window, prefix, tokens) at its peak."""
    window, sentence_len = 5, 8  # tiny_sllm: max_sentence_len 8; never_end_sentences: every sentence is full
    model = never_end_sentences(never_stop(tiny_sllm(sentence_end="learned", decoder_window=window)))
    out = model.generate(
        PROMPTS[2][None], max_new_tokens=40, suppress_tokens=[EOS], return_dict_in_generate=True
    )  # fmt: skip
    config = model.config.text_config
    per_column = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    decoder_layers = model.config.decoder_layers
    one_sentence = decoder_layers * per_column * (window + 1 + sentence_len - 1)  # fed before its last token
    backbone = cache_nbytes(out.cache)  # a row's decoder cache holds one sentence's layout at most
    assert out.peak_cache_bytes == backbone + one_sentence
    assert model.generate(PROMPTS[2][None], max_new_tokens=8, use_cache=False, return_dict_in_generate=True).peak_cache_bytes == 0


@pytest.mark.parametrize(
    "backbone_name, decoder",
    [
        ("llama", {}),  # rotary pooling: the context is rotated back by each token's target index
        ("qwen2", dict(decoder_window=3, decoder_prefix_vectors=2, sentence_pooling="mean")),
        ("opt", dict(decoder_shares_backbone=True, decoder_window=3)),  # [prefix, window, tokens]
    ],
)
def test_token_column_is_the_layouts_column(backbone_name, decoder):
    """A cached step feeds a continuing row one column: `token_column`'s inputs, at the position after
    the row's previous column. Both are what `SentenceDecoder.layout` puts in that token's column."""
    model = tiny_sllm(backbone_name, **decoder)
    sentence_decoder, embed = model.sentence_decoder, model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    condition = sentence_decoder.condition(torch.randn(3, model.config.text_config.hidden_size, generator=generator))
    tokens = torch.randint(10, VOCAB, (3, 6), generator=generator)  # [N, L]
    width = model.config.decoder_window
    window_real = torch.arange(width) >= torch.tensor([[0], [1], [width]])  # [N, W]: full, partial, empty window
    window = torch.randint(10, VOCAB, (3, width), generator=generator).masked_fill(~window_real, 0)
    with torch.no_grad():
        layout = sentence_decoder.layout(condition, embed(tokens), embed(window), window_real)
        rows = torch.arange(3)
        for length in range(1, tokens.shape[1] + 1):
            column, previous = layout.predictors[:, length], layout.predictors[:, length - 1]  # [N] each
            inputs = sentence_decoder.token_column(
                condition, embed(tokens[:, length - 1 : length]), torch.full((3,), length)
            )  # [N, 1, H]
            assert torch.equal(inputs[:, 0], layout.inputs[rows, column])
            assert torch.equal(layout.positions[rows, column], layout.positions[rows, previous] + 1)
            assert bool(layout.mask[rows, column].all())


def test_a_decoder_step_reads_the_device_once(monkeypatch):
    """The loop reads from the device once per decoder step and once per backbone step (`read_status`, one
    transfer each), plus once to start; nothing else in it reads a value (.item(), int(), bool(), nonzero)
    once the prompts are read."""
    calls = {"read_status": 0, "backbone_step": 0}
    for name in calls:
        method = getattr(SentenceLoop, name)

        def counted(loop, *args, name=name, method=method):
            calls[name] += 1
            return method(loop, *args)

        monkeypatch.setattr(SentenceLoop, name, counted)
    reads = []
    LOOP_FILES = ("generation_sllm.py", "sentence_loop.py", "decoder_steps.py", "token_buffer.py", "cache_surgery.py")

    class Reads(TorchDispatchMode):
        """Records the function of the generation loop's files that reads from the device (not the modules it calls)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                stack = traceback.extract_stack()
                frames = [f for f in stack if "modeling_sllm" in f.filename or "transformers" in f.filename]
                if frames[-1].filename.endswith(LOOP_FILES):
                    reads.append(frames[-1].name)
            return func(*args, **(kwargs or {}))

    model = never_stop(tiny_sllm(decoder_window=2))
    ids, mask = batch()
    with Reads():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=24, repetition_penalty=1.3, streamer=Recorder(),
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert len(out.scores) >= 24 and calls["backbone_step"] >= 3
    assert calls["read_status"] == 1 + len(out.scores) + calls["backbone_step"]
    assert set(reads) <= {"__init__", "read_prompt", "_loop_settings"}  # reading the prompts
