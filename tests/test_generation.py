"""Sentence-by-sentence generate: caching, batching, sampling, limits, streaming, stopping."""

import pytest
import torch
from conftest import DOT, EOS, PAD, VOCAB, left_pad, tiny_sllm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from modeling_sllm import SLLMForCausalLM, cache_nbytes

PROMPTS = [torch.tensor([10, 11, DOT, 12, 13]), torch.tensor([20, DOT]), torch.tensor([30, 31, 32, DOT, 33, DOT, 34])]


def never_stop(model: SLLMForCausalLM) -> SLLMForCausalLM:
    """Make the untrained model's stop head never fire (a worst case for termination)."""
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([50.0, -50.0]))
    return model


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
        scores[:, [PAD, EOS]] = -float("inf")
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
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
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
    model = never_stop(tiny_sllm(max_sentence_len=5))
    with torch.no_grad():
        model.sentence_decoder.end_head.bias.fill_(-1e4)  # the decoder never ends a sentence itself
    ids, mask = batch()
    for limit in (1, 7, 23):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=limit, return_dict_in_generate=True)
        assert out.sequences.shape[1] == ids.shape[1] + limit
        # sentences were cut at max_sentence_len: ceil(limit / 5) per row, all but the last encoded
        assert out.cache.get_seq_length() == 1 + 3 + -(-limit // 5) - 1


def test_backbone_cache_holds_one_entry_per_sentence():
    model = never_stop(tiny_sllm())
    prompt = PROMPTS[2][None]  # 3 sentences
    out = model.generate(prompt, max_new_tokens=200, max_new_sentences=4, return_dict_in_generate=True)
    # start state + prompt sentences + new sentences but the last (nothing reads its state)
    assert out.cache.get_seq_length() == 1 + 3 + 3
    generated = model.segment(out.sequences[:, prompt.shape[1] :])
    assert generated.num_sentences.item() >= 4
    layer = out.cache.layers[0]
    config = model.config.text_config
    per_entry = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert cache_nbytes(out.cache) == config.num_hidden_layers * per_entry * 7
    assert layer.keys.shape[-2] == 7


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


def test_min_new_tokens_and_eos():
    model = tiny_sllm()
    with torch.no_grad():
        model.stop_head.bias.copy_(torch.tensor([-50.0, 50.0]))  # wants to stop at once
    prompt = PROMPTS[0][None]
    assert model.generate(prompt, max_new_tokens=20).shape[1] == prompt.shape[1]
    assert model.generate(prompt, max_new_tokens=20, min_new_tokens=6).shape[1] >= prompt.shape[1] + 6

    class ForceEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] >= prompt.shape[1] + 3:
                scores[:, :] = -float("inf")
                scores[:, EOS] = 0
            return scores

    never_stop(model)
    out = model.generate(prompt, max_new_tokens=20, logits_processor=LogitsProcessorList([ForceEos()]))
    assert out[0, -1].item() == EOS and out.shape[1] == prompt.shape[1] + 4


def test_user_stopping_criteria_apply():
    model = never_stop(tiny_sllm())

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 12, dtype=torch.bool)

    prompt = PROMPTS[0][None]
    free = model.generate(prompt, max_new_tokens=60)
    stopped = model.generate(prompt, max_new_tokens=60, stopping_criteria=StoppingCriteriaList([AtLength()]))
    assert 12 <= stopped.shape[1] < free.shape[1]
    assert torch.equal(stopped[0], free[0, : stopped.shape[1]])


def test_streamer_gets_each_sentence_as_it_is_written():
    model = never_stop(tiny_sllm())

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    prompt = PROMPTS[0][None]
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
    from peft import LoraConfig, get_peft_model

    model = never_stop(tiny_sllm())
    prompt = PROMPTS[0][None]
    expected = model.generate(prompt, max_new_tokens=20)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r"llm\..*q_proj", task_type="CAUSAL_LM"))
    assert torch.equal(peft_model.generate(input_ids=prompt, max_new_tokens=20), expected)


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
