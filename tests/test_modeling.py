"""SLLMForCausalLM: construction, the loss and its definition, leak-freedom, reconstruction."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKBONE_CONFIGS,
    BOUNDARIES,
    CONTINUATIONS,
    DOT,
    EOS,
    NEWLINE,
    PAD,
    VOCAB,
    at_sentence_start,
    decoder_class_logits,
    left_pad,
    random_text,
    tiny_backbone,
    tiny_sllm,
)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from modeling_sllm import SLLMConfig, SLLMForCausalLM, loss_sllm
from modeling_sllm.sentence_vae import rotate, token_window


def test_every_backbone_trains(backbone_name):
    model = tiny_sllm(backbone_name).train()
    ids = random_text(3, 40)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    trained = [
        model.start_embedding.weight,
        model.stop_head.weight,
        model.sentence_encoder.proj.weight,
        model.sentence_decoder.context_proj.weight,
        model.get_input_embeddings().weight,
        *[p for n, p in model.llm.named_parameters() if ".0." in n],
    ]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing unused (DDP)


def test_auto_classes_resolve():
    config = tiny_sllm().config
    assert isinstance(AutoConfig.for_model("sllm", text_config=config.text_config.to_dict()), SLLMConfig)
    assert type(AutoModel.from_config(config)) is SLLMForCausalLM
    assert type(AutoModelForCausalLM.from_config(config)) is SLLMForCausalLM


def test_from_base_model_keeps_backbone_weights_and_warm_starts(backbone_name):
    backbone = tiny_backbone(backbone_name)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = tiny_sllm(backbone_name, encoder_layers=2, decoder_layers=1)
    assert all(torch.equal(v, before[k]) for k, v in model.llm.state_dict().items())
    first = [p for n, p in backbone.get_decoder().named_parameters() if ".0." in n]
    enc = [p for n, p in model.sentence_encoder.layers.named_parameters() if ".0." in n]
    assert len(first) == len(enc) > 0 and all(torch.equal(a, b) for a, b in zip(first, enc))
    last = [p for n, p in backbone.get_decoder().named_parameters() if ".2." in n]
    dec = [p for n, p in model.sentence_decoder.layers.named_parameters() if ".0." in n]
    assert all(torch.equal(a, b) for a, b in zip(last, dec))
    # the backbone's embeddings are shared, not copied
    assert model.get_input_embeddings() is model.llm.get_input_embeddings()


def test_random_init_does_not_copy():
    backbone = tiny_backbone()
    model = tiny_sllm(sentence_init="random")
    first = dict(backbone.get_decoder().layers[0].named_parameters())
    enc = dict(model.sentence_encoder.layers.layers[0].named_parameters())
    assert not torch.equal(first["self_attn.q_proj.weight"], enc["self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"encoder_layers": 0}, "encoder_layers"),
        ({"max_sentence_len": -1}, "max_sentence_len"),
        ({"sentence_init": "zeros"}, "sentence_init"),
        ({"objective": "mlm"}, "objective"),
        ({"sentence_dropout": 1.5}, "sentence_dropout"),
        ({"decoder_word_dropout": 1.0}, "decoder_word_dropout"),
        ({"sampled_negatives": -1}, "sampled_negatives"),
        ({"sentence_pooling": "max"}, "sentence_pooling"),
        ({"sentence_end_token_ids": [VOCAB + 3]}, "sentence_end_token_ids"),
        ({"decoder_layers": 9}, "decoder_layers"),
        ({"sentence_num_attention_heads": 2}, "sentence_num_attention_heads"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SLLMConfig(text_config=tiny_backbone().config, **kwargs)


def test_refuses_backbones_it_cannot_drive():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="encoder-decoder"):
        SLLMForCausalLM.from_base_model(t5, **BOUNDARIES)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        SLLMForCausalLM.from_base_model(torch.nn.Linear(2, 2), **BOUNDARIES)
    with pytest.raises(ValueError, match="tokenizer"):
        SLLMForCausalLM.from_base_model(tiny_backbone())


def test_bad_inputs_fail_early_with_clear_errors():
    model = tiny_sllm()
    ids, mask = left_pad([torch.tensor([10, DOT, 11]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"rows \[1\].*empty or all padding"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="labels must equal input_ids"):
        model(input_ids=ids[:1], labels=ids[:1].roll(1, -1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


@pytest.mark.parametrize(
    "sentence_end, ids",
    [("learned", [10, 11, DOT, 12, 13, 14, DOT, 15]), ("rule", [10, 11, DOT, 5, 12, DOT, 13, NEWLINE, 14, 15])],
)
def test_loss_is_total_nll_over_scored_tokens(sentence_end, ids):
    """Recompute the loss from its definition: every token, sentence ends and the end of text. With
    rule ends, the cut last sentence has no end to score (the text just stops: the stop head's)."""
    model = tiny_sllm(sentence_end=sentence_end)
    ids = torch.tensor([ids])
    out = model(input_ids=ids, labels=ids, return_token_log_probs=True)
    seg = model.segment(ids)
    embed = model.get_input_embeddings()
    vectors = model.encode_sentences(seg.sentences[0], seg.lengths[0])
    inputs = torch.cat([model.start_embedding.weight, vectors])[None]
    states = model.llm.get_decoder()(inputs_embeds=inputs).last_hidden_state[0]
    total, before = 0.0, None
    for i, (sentence, length) in enumerate(zip(seg.sentences[0], seg.lengths[0])):
        sentence = sentence[:length]
        dec = model.sentence_decoder
        cond = dec.condition(states[i : i + 1])
        hidden = dec(cond, embed(sentence[None])).last_hidden_state[0]
        log_probs = F.log_softmax(decoder_class_logits(model, hidden, sentence, before), -1)
        before = sentence
        targets = sentence.tolist() + [VOCAB]  # tokens, then the sentence end
        if sentence_end == "rule" and targets[-2] not in (DOT, NEWLINE):
            targets.pop()  # the text is cut here: no sentence end
        total -= sum(log_probs[j, t] for j, t in enumerate(targets))
        total -= F.log_softmax(model.stop_head(states[i]), -1)[0]  # "another sentence follows"
    total -= F.log_softmax(model.stop_head(states[-1]), -1)[1]  # "the text ends here"
    assert torch.allclose(out.text_loss, total / ids.numel(), atol=1e-5)
    assert out.num_tokens.item() == ids.numel()
    assert torch.allclose(out.sentence_losses.sum() + out.end_of_text_losses.sum(), total, atol=1e-4)
    assert torch.allclose(out.token_log_probs.sum(), -total, atol=1e-4)


def test_rule_ends_are_the_segmentation_rule_as_a_distribution():
    """sentence_end="rule": the end is certain after a hard end or at max_sentence_len, impossible at a
    sentence's start or after an ordinary token, and after "." it takes the mass of the tokens that
    would not glue to it (those leave the sentence to the next one). Each row is a distribution."""
    model = tiny_sllm(sentence_end="rule")
    assert not list(model.sentence_decoder.end_head.parameters())  # nothing learned: the rule decides
    states, token_logits = torch.randn(6, 32), torch.randn(6, VOCAB)
    previous = torch.tensor([-1, 10, DOT, NEWLINE, EOS, 11])
    length = torch.tensor([0, 3, 3, 3, 3, 8])  # max_sentence_len is 8
    log_probs = model.sentence_decoder.class_logits(
        states, token_logits, previous, length, model.segmentation_rule
    )  # [6, V+1]
    assert torch.allclose(log_probs.logsumexp(-1), torch.zeros(6), atol=1e-5)
    q = token_logits.log_softmax(-1)
    assert torch.allclose(log_probs[:2, :VOCAB], q[:2]) and bool((log_probs[:2, VOCAB] == -math.inf).all())
    glued = torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, torch.tensor(CONTINUATIONS), True)
    assert torch.allclose(log_probs[2, :VOCAB][glued], q[2][glued])
    assert bool((log_probs[2, :VOCAB][~glued] == -math.inf).all())
    assert torch.allclose(log_probs[2, VOCAB].exp(), 1 - q[2][glued].exp().sum())
    assert bool((log_probs[3:, VOCAB] == 0).all()) and bool((log_probs[3:, :VOCAB] == -math.inf).all())
    with pytest.raises(ValueError, match="sentence_end must be one of"):
        tiny_sllm(sentence_end="head")


def test_labels_minus_100_are_not_scored():
    model = tiny_sllm()
    ids = random_text(2, 30)
    labels = ids.clone()
    labels[:, :10] = -100
    full, partial = model(input_ids=ids, labels=ids), model(input_ids=ids, labels=labels)
    assert partial.num_tokens.item() == full.num_tokens.item() - 20
    assert not torch.allclose(full.loss, partial.loss)


def test_leak_free(backbone_name):
    """Changing the tokens of sentence j leaves the loss of every earlier sentence unchanged."""
    model = tiny_sllm(backbone_name)
    ids = torch.tensor([[10, 11, DOT, 12, 13, 14, DOT, 15, 16, DOT, 17, 18, DOT]])
    base = model(input_ids=ids, labels=ids).sentence_losses[0]
    changed = ids.clone()
    changed[0, 7:9] = torch.tensor([40, 41])  # sentence 2 only, same length
    after = model(input_ids=changed, labels=changed).sentence_losses[0]
    assert torch.allclose(base[:2], after[:2], atol=1e-6)
    assert not torch.allclose(base[2], after[2])
    assert not torch.allclose(base[3], after[3])  # later sentences do see it


def test_batched_equals_single_rows():
    model = tiny_sllm()
    rows = [torch.tensor([10, 11, DOT, 12, 13, DOT, 14]), torch.tensor([20, DOT, 21, 22, 23, 24, 25, 26, 27, 28, 29])]
    ids, mask = left_pad(rows)
    batched = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    for b, row in enumerate(rows):
        single = model(input_ids=row[None], labels=row[None])
        n = single.sentence_losses.shape[1]
        assert torch.allclose(batched.sentence_losses[b, :n], single.sentence_losses[0], atol=1e-5)
        assert torch.allclose(batched.end_of_text_losses[b], single.end_of_text_losses[0], atol=1e-5)


def test_reconstruction_objective_and_metrics():
    """token_accuracy: the argmax-correct share of the scored targets (tokens and sentence ends);
    exact_match: the share of sentences with all of theirs correct; the loss: their NLL per scored
    token. Known by hand for a head that puts nearly all the mass on token 20 whatever it reads."""
    model = tiny_sllm(objective="reconstruction", max_sentence_len=4)  # rule ends
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        lm_head.weight.zero_()
        lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB).index_fill(0, torch.tensor([20]), 10.0))
    ids, mask = left_pad([torch.tensor([20] * 8), torch.tensor([20, 20, DOT])])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    # [20 20 20 20] twice: 4 right tokens, then the end, certain at max_sentence_len; [20 20 .]: the "."
    # is wrong (20 wins), the end after it right (the tokens that would not glue leave it all their mass)
    assert out.token_accuracy.item() == pytest.approx(13 / 14) and out.exact_match.item() == pytest.approx(2 / 3)
    z = math.exp(10) + VOCAB - 1  # the softmax's normaliser
    nll_20, nll_dot, nll_end_after_dot = math.log(z) - 10, math.log(z), math.log(z / (z - len(CONTINUATIONS)))
    assert out.num_tokens.item() == 11
    assert out.loss.item() == pytest.approx((10 * nll_20 + nll_dot + nll_end_after_dot) / 11, rel=1e-4)
    labels[1, -1] = -100  # the "." not scored, nor the end that follows it
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.token_accuracy.item() == 1 and out.exact_match.item() == 1
    assert out.loss.item() == pytest.approx(nll_20, rel=1e-4)
    model = tiny_sllm(objective="reconstruction")
    # an over-fitted tiny model reconstructs its sentences exactly
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sentence = torch.tensor([[10, 11, 12, DOT, 20, 21, DOT]])
    for _ in range(150):
        optimizer.zero_grad()
        model(input_ids=sentence, labels=sentence).loss.backward()
        optimizer.step()
    out = model.eval()(input_ids=sentence, labels=sentence)
    assert out.token_accuracy == 1 and out.exact_match == 1


def test_activation_checkpointing_gives_the_same_gradients():
    ids = random_text(2, 24)
    grads = []
    for checkpointing in (False, True):
        model = tiny_sllm().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.llm.get_decoder().gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.sentence_encoder.proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gradient_accumulation_matches_the_full_batch():
    """Two halves scaled by the batch's count of shifted labels (as Trainer passes it) equal the full batch."""
    ids, mask = left_pad([random_text(1, n, seed=n)[0] for n in (30, 12, 25, 7)])
    labels = ids.masked_fill(mask == 0, -100)
    full_model, acc_model = tiny_sllm().train(), tiny_sllm().train()
    full = full_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    count = (labels[:, 1:] != -100).sum()
    acc = sum(
        acc_model(input_ids=ids[s], attention_mask=mask[s], labels=labels[s], num_items_in_batch=count).loss
        for s in (slice(0, 2), slice(2, 4))
    )
    acc.backward()
    assert torch.allclose(full, acc, atol=1e-5)
    for p, q in zip(full_model.parameters(), acc_model.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_in_batch_vocabulary_is_a_training_only_softmax_over_the_batch_targets():
    model = tiny_sllm(objective="reconstruction", training_vocab="in_batch", sampled_negatives=0, sentence_end="learned")
    ids = random_text(2, 30)
    full = model.eval()(input_ids=ids, labels=ids).loss  # eval: full vocabulary
    model.config.training_vocab = "full"
    assert torch.equal(full, model(input_ids=ids, labels=ids).loss)
    model.train().config.training_vocab = "in_batch"
    sampled = model(input_ids=ids, labels=ids)
    assert sampled.loss < full  # fewer competitors: a lower (biased) training loss
    # the logits are exactly the full logits' columns of the batch's target tokens, then the sentence end
    states, targets = torch.randn(5, 32), torch.tensor([12, 40, VOCAB, 12, 33])
    logits, classes = model.output_logits(states, targets, *at_sentence_start(5))
    model.eval()
    full, _ = model.output_logits(states, targets, *at_sentence_start(5))
    assert torch.allclose(logits, full[:, [12, 33, 40, VOCAB]], atol=1e-6)
    assert classes.tolist() == [0, 2, 3, 0, 1]
    sampled.loss.backward()
    assert model.sentence_decoder.end_head.weight.grad is not None


def candidate_columns(logits: torch.Tensor, full: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
    """Which token each token column of a sampled softmax's logits [M, C+1] is: the token t and the
    offset d with logits[:, c] = full[:, t] + d in every row, full [M, V+1] being the full-vocabulary
    logits of the same states. Returns tokens [C] and offsets [C]."""
    diff = logits[:, :-1, None] - full[:, None, :VOCAB]  # [M, C, V]
    spread = diff.amax(0) - diff.amin(0)  # [C, V]: 0 where column c is token t's, shifted
    closest = spread.topk(2, largest=False)  # [C, 2]: its token's column, then the next closest
    assert bool((closest.values[:, 0] < 1e-4).all()) and bool((closest.values[:, 1] > 1e-2).all())
    tokens = closest.indices[:, 0]  # [C]
    return tokens, diff[0, torch.arange(len(tokens)), tokens]


def test_sampled_negatives_join_the_batch_targets():
    """Whatever is drawn: the classes are the batch's target tokens, at most k more tokens and the
    sentence end, each column the full logits' column of its token, each target's class its token's
    column. The negatives are drawn afresh at each call."""
    model = tiny_sllm(objective="reconstruction", training_vocab="in_batch", sampled_negatives=6, sentence_end="learned")
    states, targets = torch.randn(5, 32), torch.tensor([12, 40, VOCAB, 12, 33])
    full, _ = model.eval().output_logits(states, targets, *at_sentence_start(5))
    model.train()
    drawn = set()
    for _ in range(10):
        logits, classes = model.output_logits(states, targets, *at_sentence_start(5))
        tokens, offsets = candidate_columns(logits, full)
        assert {12, 33, 40} <= set(tokens.tolist()) and len(set(tokens.tolist())) == len(tokens) <= 3 + 6
        assert torch.allclose(offsets, torch.zeros_like(offsets), atol=1e-5)  # in_batch: the raw logits
        assert torch.allclose(logits[:, -1], full[:, VOCAB], atol=1e-6)  # the sentence end, last
        assert tokens[classes[[0, 1, 3, 4]]].tolist() == [12, 40, 12, 33] and classes[2] == len(tokens)
        drawn |= set(tokens.tolist()) - {12, 33, 40}
    assert len(drawn) > 6  # not one fixed set of negatives


def test_decoder_word_dropout_hides_teacher_forced_tokens_in_training_only():
    plain, dropped = tiny_sllm(seed=1), tiny_sllm(seed=1, decoder_word_dropout=0.5)
    ids = random_text(2, 30)
    assert torch.equal(plain(input_ids=ids, labels=ids).loss, dropped(input_ids=ids, labels=ids).loss)  # eval
    plain.train(), dropped.train()
    reference = plain(input_ids=ids, labels=ids).loss  # sentence_dropout is 0: nothing random, no seed needed
    assert torch.equal(reference, plain(input_ids=ids, labels=ids).loss)
    losses = {round(float(dropped(input_ids=ids, labels=ids).loss), 6) for _ in range(3)}
    assert len(losses) == 3 and round(float(reference), 6) not in losses


def test_deterministic_in_eval_and_embeddings_get_set():
    model = tiny_sllm()
    ids = random_text(2, 30)
    assert torch.equal(model(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    new = torch.nn.Embedding(VOCAB, 32)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.llm.get_input_embeddings() is new
    assert model.get_output_embeddings() is model.llm.get_output_embeddings()


def test_a_few_optimizer_steps_reduce_the_loss(backbone_name):
    model = tiny_sllm(backbone_name).train()
    ids = random_text(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_rotary_pooling_lines_up_each_token_state_at_its_decoder_position():
    # Encoder: token i's state turned by i, summed; decoder position j turns the sum back by j.
    states = torch.randn(16, 512)  # [L, H]: one sentence's final encoder states
    pooled = rotate(states, torch.arange(16)).sum(0) / 4  # [H]
    read = rotate(pooled, -torch.arange(16))  # [L, H]: what each decoder position sees
    similarity = F.normalize(read, dim=-1) @ F.normalize(states, dim=-1).T  # [L, L]
    assert torch.equal(similarity.argmax(-1), torch.arange(16))
    assert torch.allclose(rotate(rotate(states, torch.arange(16)), -torch.arange(16)), states, atol=1e-5)

    model = tiny_sllm(sentence_pooling="rotary")
    eye = torch.eye(32)
    assert torch.equal(model.sentence_encoder.proj.weight, eye)  # the binding holds from the first step
    assert torch.equal(model.sentence_decoder.context_proj.weight, eye)
    condition, tokens = torch.randn(2, 1, 32), torch.zeros(2, 3, 32)
    expected = rotate(condition, -torch.arange(1, 4))  # [2, 3, 32]: token j sits at decoder position j+1
    assert torch.allclose(model.sentence_decoder.with_context(condition, tokens, torch.arange(1, 4)), expected)
    mean = tiny_sllm(sentence_pooling="mean")
    assert torch.equal(
        mean.sentence_decoder.with_context(condition, tokens, torch.arange(1, 4)), condition.expand(2, 3, 32)
    )


def reference_token_log_probs(model, ids: torch.LongTensor) -> torch.Tensor:
    """log p of each token of one unpadded row [1, T] -> [T], recomputed from the definition: a sentence's
    "continue" decision on its first token, its end on its last, the end of text on the row's last."""
    seg = model.segment(ids)
    embed, dec = model.get_input_embeddings(), model.sentence_decoder
    vectors = model.encode_sentences(seg.sentences[0], seg.lengths[0])
    inputs = torch.cat([model.start_embedding.weight, vectors])[None]
    states = model.llm.get_decoder()(inputs_embeds=inputs).last_hidden_state[0]  # [S+1, H]
    stop = F.log_softmax(model.stop_head(states), -1)  # [S+1, 2]
    log_probs, before = [], None
    for i, (sentence, length) in enumerate(zip(seg.sentences[0], seg.lengths[0])):
        hidden = dec(dec.condition(states[i : i + 1]), embed(sentence[None, :length])).last_hidden_state[0]
        target_log_probs = F.log_softmax(decoder_class_logits(model, hidden, sentence[:length], before), -1)
        before = sentence[:length]  # target_log_probs: [L+1, V+1]
        row = [target_log_probs[j, t] for j, t in enumerate(sentence[:length].tolist())]
        row[0] = row[0] + stop[i, 0]
        if not (model.config.sentence_end == "rule" and i == len(seg.lengths[0]) - 1 and sentence[length - 1] != DOT):
            row[-1] = row[-1] + target_log_probs[length, VOCAB]  # (a text cut mid-sentence has no rule end)
        log_probs += row
    log_probs[-1] = log_probs[-1] + stop[-1, 1]
    return torch.stack(log_probs)


def test_token_log_probs_fold_each_decision_into_the_token_that_pays_it():
    model = tiny_sllm()
    for ids in (torch.tensor([[10, 11, DOT, 12, 13, 14, DOT, 15]]), random_text(1, 30, seed=3)):
        out = model(input_ids=ids, return_token_log_probs=True)
        assert torch.allclose(out.token_log_probs[0], reference_token_log_probs(model, ids), atol=1e-5)
    assert model(input_ids=ids).token_log_probs is None


def test_token_log_probs_sum_to_the_loss_with_left_padding_and_unscored_tokens():
    model = tiny_sllm()
    rows = [random_text(1, n, seed=n)[0] for n in (30, 12, 21)]
    ids, mask = left_pad(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5:14] = -100  # an unscored stretch (a prompt), cut mid-sentence
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_token_log_probs=True)
    scored = labels != -100
    assert out.token_log_probs.shape == ids.shape
    assert torch.allclose(out.token_log_probs.sum(), -out.text_loss * out.num_tokens, atol=1e-4)
    assert torch.all(out.token_log_probs[~scored] == 0) and torch.all(out.token_log_probs[scored] < 0)
    for b, row in enumerate(rows):  # each row alone, every token scored: the same values where scored
        alone = model(input_ids=row[None], return_token_log_probs=True).token_log_probs[0]
        keep = scored[b, -len(row) :]
        assert torch.allclose(out.token_log_probs[b, -len(row) :][keep], alone[keep], atol=1e-5)


def test_return_dict_false_returns_the_output_as_a_tuple():
    model = tiny_sllm()
    ids = random_text(2, 20)
    out = model(input_ids=ids, labels=ids)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == 7  # loss, logits, text, sentence and end losses, count, states
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, out.to_tuple()))
    model.config.return_dict = False  # the config's default, as in Transformers
    assert type(model(input_ids=ids)) is tuple
    reconstruction = tiny_sllm(objective="reconstruction")
    loss = reconstruction(input_ids=ids).loss
    assert torch.equal(reconstruction(input_ids=ids, return_dict=False)[0], loss)


def test_backbone_hidden_states_and_attentions_over_sentence_positions():
    model = tiny_sllm()
    ids, mask = left_pad([torch.tensor([10, DOT, 11, 12, DOT, 13]), torch.tensor([20, 21, DOT])])
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 4  # the inputs, then each of the 3 layers: [B, S+1, H]
    assert all(h.shape == out.sentence_states.shape == (2, 4, 32) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.sentence_states)
    assert model(input_ids=ids, attention_mask=mask).hidden_states is None
    with pytest.raises(ValueError, match="output_attentions needs the backbone's eager attention"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation("eager")
    attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(attentions) == 3 and attentions[0].shape == (2, 4, 4, 4)  # [B, heads, S+1, S+1]
    assert torch.all(attentions[0][0].triu(1) == 0)  # causal over sentences
    assert torch.all(attentions[0][1, :, :, 2:] == 0)  # row 1 has one sentence: its padding is never attended
    with pytest.raises(ValueError, match="reconstruction.*does not run the backbone"):
        tiny_sllm(objective="reconstruction")(input_ids=ids, output_hidden_states=True)


def test_token_ids_outside_the_vocabulary_are_refused_before_indexing():
    model = tiny_sllm()
    for bad in (VOCAB, -1):
        ids = random_text(1, 10)
        ids[0, 3] = bad
        with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {VOCAB}\): \[{bad}\]"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.check_token_ids(ids)
    model.check_token_ids(random_text(1, 10))


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_absolute_positions_limit_sentences_and_their_length(name):
    config = BACKBONE_CONFIGS[name]()
    config.max_position_embeddings = 16  # GPT-2 n_positions
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="max_sentence_len=16 needs 17 positions in the Sentence Decoder"):
        SLLMForCausalLM.from_base_model(backbone, **BOUNDARIES, max_sentence_len=16)
    model = SLLMForCausalLM.from_base_model(backbone, **BOUNDARIES, max_sentence_len=15).eval()
    assert model.max_backbone_positions() == 16 and tiny_sllm("llama").max_backbone_positions() is None
    assert torch.isfinite(model(input_ids=torch.arange(10, 25)[None]).loss)  # one 15-token sentence: 16 positions
    assert torch.isfinite(model(input_ids=torch.tensor([[10, DOT] * 15])).loss)  # start state + 15 sentences
    with pytest.raises(ValueError, match="has 16 sentences: .* needs 17 positions, but .* has 16"):
        model(input_ids=torch.tensor([[10, DOT] * 16]))


DECODER_OPTIONS = [
    {"decoder_window": 4},
    {"decoder_window": 4, "decoder_prefix_vectors": 3},
    {"decoder_shares_backbone": True, "decoder_window": 3},
    {"decoder_shares_backbone": True, "decoder_window": 3, "sentence_end": "rule"},
    {"sentence_end": "rule", "decoder_window": 2},
    {"backbone_input": "embedding_mean", "decoder_layers": 2, "decoder_warm_start": "first_last"},
]


@pytest.mark.parametrize("options", DECODER_OPTIONS, ids=str)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoder_options_are_leak_free(name, options):
    """With a token window, prefix vectors or a shared decoder, changing sentence j still leaves
    every earlier sentence's loss unchanged, and later ones see it."""
    model = tiny_sllm(name, **options)
    with torch.no_grad():  # move the zero-initialised projections, so that every path carries information
        for parameter in model.sentence_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.tensor([[10, 11, DOT, 12, 13, 14, DOT, 15, 16, DOT, 17, 18, DOT]])
    base = model(input_ids=ids, labels=ids).sentence_losses[0]
    changed = ids.clone()
    changed[0, 7:9] = torch.tensor([40, 41])
    after = model(input_ids=changed, labels=changed).sentence_losses[0]
    assert torch.allclose(base[:2], after[:2], atol=1e-6)
    assert not torch.allclose(base[2], after[2])
    assert not torch.allclose(base[3], after[3])


def test_token_windows_hold_the_previous_real_tokens():
    model = tiny_sllm(decoder_window=3)
    ids = torch.tensor([[PAD, PAD, 10, 11, DOT, 12, DOT, 13, 14, DOT]])  # left padded
    mask = (ids != PAD).long()
    start = model.segment(ids, mask).token_index[..., 0]  # [1, 3] first column of each sentence
    window_ids, window_mask = token_window(ids, mask, start, 3)  # [1, 3, 3]
    assert window_mask[0].tolist() == [[False] * 3, [True] * 3, [True] * 3]
    assert window_ids[0, 1].tolist() == [10, 11, DOT]
    assert window_ids[0, 2].tolist() == [DOT, 12, DOT]
    short = torch.tensor([[10, DOT, 12, DOT]])  # one token before the second sentence
    window_ids, window_mask = token_window(short, None, model.segment(short).token_index[..., 0], 3)
    assert window_mask[0, 1].tolist() == [False, True, True] and window_ids[0, 1, 1:].tolist() == [10, DOT]


def test_decoder_window_changes_what_the_decoder_reads():
    """The same sentence after different earlier tokens gets a different loss only through the window
    when the backbone context is held fixed."""
    model = tiny_sllm(decoder_window=4)
    sentences, lengths = torch.tensor([[20, 21, DOT]]), torch.tensor([3])
    context = torch.randn(1, 32)
    nll = [
        -model.target_log_probs(
            model.decode(context, sentences, lengths, (torch.tensor([[w, w, w, DOT]]), torch.ones(1, 4)))[0],
            torch.tensor([20, 21, DOT, VOCAB]), torch.tensor([-1, 20, 21, DOT]), torch.arange(4),
        ).sum()
        for w in (30, 31)
    ]  # fmt: skip
    assert not torch.allclose(nll[0], nll[1])


def test_decoder_options_start_from_what_is_known():
    """Prefix vectors start as m copies of the condition; a shared decoder starts with no context
    (the backbone's own language model); embedding_mean inputs start as the mean token embedding;
    first_last warm-starts from both ends of the backbone."""
    from modeling_sllm.modeling_sllm import decoder_start_layers

    model = tiny_sllm(decoder_prefix_vectors=3)
    condition = model.sentence_decoder.condition(torch.randn(2, 32))
    assert torch.allclose(model.sentence_decoder.prefix(condition), condition.expand(2, 3, 32))
    shared = tiny_sllm(decoder_shares_backbone=True, decoder_window=3)
    assert shared.sentence_decoder.layers is None
    assert not shared.sentence_decoder.context_proj.weight.any()
    mean_input = tiny_sllm(backbone_input="embedding_mean")
    sentences, lengths = torch.tensor([[20, 21, DOT]]), torch.tensor([3])
    expected = mean_input.get_input_embeddings()(sentences).mean(1)
    assert torch.allclose(mean_input.encode_sentences(sentences, lengths), expected, atol=1e-6)
    config = tiny_sllm(decoder_layers=2, decoder_warm_start="first_last").config
    assert decoder_start_layers(config, 3) == [0, 2]


def test_contrastive_term_is_added_in_training_only():
    """In training the loss adds contrastive_weight x the InfoNCE summed over the batch's N sentences,
    per scored token. With the decoder's context projection at 0 every query is 0, so no sentence is
    picked out: each term is log N. Cosine / 0.1 and each query's own sentence as its target: a query
    equal to its sentence's vector, orthogonal to the other's, costs log(1 + e^-10), swapped log(1 + e^10)."""
    ids, mask = left_pad([torch.tensor([10, 11, DOT, 12, DOT, 13, 14, DOT, 15]), torch.tensor([20, 21, DOT, 22])])
    plain, contrastive = tiny_sllm(), tiny_sllm(contrastive_weight=0.5)
    eval_losses = [model(input_ids=ids, attention_mask=mask).loss for model in (plain, contrastive)]
    assert torch.allclose(*eval_losses)  # eval: the NLL alone
    for model in (plain, contrastive):
        with torch.no_grad():
            model.sentence_decoder.context_proj.weight.zero_()
            model.sentence_decoder.context_proj.bias.zero_()
    plain_out = plain.train()(input_ids=ids, attention_mask=mask)
    out = contrastive.train()(input_ids=ids, attention_mask=mask)
    n = 6  # 4 + 2 sentences, not the 2 x 4 slots of the padded batch
    assert out.num_tokens.item() == 13
    assert torch.allclose(out.text_loss - plain_out.text_loss, torch.tensor(0.5 * n * math.log(n) / 13), atol=1e-5)
    with torch.no_grad():
        contrastive.sentence_decoder.context_proj.weight.copy_(torch.eye(32))
    context, vectors = 3 * torch.eye(32)[:2], 5 * torch.eye(32)[:2]  # [2, H] each
    condition = contrastive.sentence_decoder.condition
    aligned = loss_sllm.contrastive_loss(condition(context)[:, 0], vectors)
    assert torch.allclose(aligned, torch.tensor(2 * math.log1p(math.exp(-10))), atol=1e-6)
    swapped = loss_sllm.contrastive_loss(condition(context)[:, 0], vectors.flip(0))
    assert torch.allclose(swapped, torch.tensor(2 * math.log1p(math.exp(10))))


def test_sampled_vocabulary_corrects_drawn_tokens_by_their_inclusion_probability():
    """training_vocab="sampled", whatever is drawn: batch targets keep their logits, tokens only drawn
    as negatives get -log(chance to be drawn among k uniform draws). When every token is drawn the
    sampled softmax is the full one; otherwise the sampled loss estimates the full softmax loss far
    better than the uncorrected in-batch loss, which is biased low."""
    model = tiny_sllm(training_vocab="sampled", sampled_negatives=16, sentence_end="learned")  # raw logits
    states, targets = torch.randn(5, 32), torch.tensor([12, 40, VOCAB, 12, 33])
    full, _ = model.eval().output_logits(states, targets, *at_sentence_start(5))
    correction = -math.log(1 - (1 - 1 / VOCAB) ** 16)  # about log(V / k)
    model.train()
    for _ in range(5):
        logits, classes = model.output_logits(states, targets, *at_sentence_start(5))
        tokens, offsets = candidate_columns(logits, full)
        target = torch.isin(tokens, targets)
        assert int(target.sum()) == 3 and bool((~target).any()) and len(tokens) <= 3 + 16
        assert torch.allclose(offsets[target], torch.zeros(3), atol=1e-5)
        assert torch.allclose(offsets[~target], torch.full(((~target).sum(),), correction), atol=1e-5)
        assert tokens[classes[[0, 1, 3, 4]]].tolist() == [12, 40, 12, 33] and classes[2] == len(tokens)
    ids = random_text(4, 40)
    model = tiny_sllm(sampled_negatives=4096)  # every token drawn (but for a chance of 64 (63/64)^4096)
    full_loss = model(input_ids=ids, labels=ids).loss
    for vocab in ("sampled", "in_batch"):
        model.train().config.training_vocab = vocab
        assert torch.allclose(model(input_ids=ids, labels=ids).loss, full_loss, atol=1e-5)
    model.eval().config.sampled_negatives = 8
    losses = {}
    for vocab in ("sampled", "in_batch"):
        model.train().config.training_vocab = vocab
        losses[vocab] = torch.stack([model(input_ids=ids, labels=ids).loss.detach() for _ in range(16)]).mean()
    assert losses["in_batch"] < losses["sampled"]
    assert abs(losses["sampled"] - full_loss) < abs(losses["in_batch"] - full_loss) / 2


@pytest.mark.parametrize("context_norm", [True, False])
def test_the_decoder_reads_its_tokens_beside_the_context_at_initialisation(context_norm):
    """Two different tokens at one sentence position must reach the decoder as different inputs, by a
    share of their norm comparable to the backbone's own inputs (its token embeddings): the context (a
    backbone output state, ~50x a token embedding here) must not drown them. Without the context norm
    (configs saved before it) they are drowned."""
    model = tiny_sllm(decoder_context_norm=context_norm)
    ids = random_text(2, 24)
    with torch.no_grad():
        context = model(input_ids=ids).sentence_states[:, 1:3].reshape(-1, 32)  # [4, H] real backbone states
        condition = model.sentence_decoder.condition(context)  # [4, 1, H]
        embed = model.get_input_embeddings()
        a, b = torch.full((4, 3), 10), torch.full((4, 3), 11)  # the same sentence position, two tokens
        inputs_a = model.sentence_decoder.layout(condition, embed(a)).inputs[:, -3:]  # [4, 3, H] the tokens' columns
        inputs_b = model.sentence_decoder.layout(condition, embed(b)).inputs[:, -3:]
        decoder_share = ((inputs_a - inputs_b).norm(dim=-1) / inputs_a.norm(dim=-1)).mean()
        backbone_share = (embed.weight[10] - embed.weight[11]).norm() / embed.weight[10].norm()
    assert context.norm(dim=-1).mean() > 20 * embed.weight.norm(dim=-1).mean()  # the scale gap being tested
    if context_norm:
        assert decoder_share > 0.4 * backbone_share
    else:
        assert decoder_share < 0.1 * backbone_share


def test_only_sentences_with_scored_tokens_are_decoded_and_the_others_cost_nothing():
    """A context given with labels -100 is read by the backbone but not decoded: the scored tokens get the
    log-probabilities they get when everything is scored, and the decoder sees only their sentences and the
    one before the first of them (whose end the causal loss has that sentence's first token pay)."""
    model = tiny_sllm(decoder_window=4)
    ids = torch.tensor([[10, 11, DOT, 12, 13, DOT, 14, 15, 16, DOT, 17, 18, DOT]])  # 4 sentences
    labels = ids.clone()
    labels[:, :6] = -100  # the first two sentences are context only
    rows = []
    model.sentence_decoder.register_forward_hook(lambda module, args, output: rows.append(args[1].shape[0]))
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids, return_token_log_probs=True, return_logits=False)
        context_only = model(input_ids=ids, labels=labels, return_token_log_probs=True, return_logits=False)
    assert rows == [4, 3]
    scored = labels != -100
    assert torch.allclose(context_only.token_log_probs[scored], full.token_log_probs[scored], atol=1e-5)
    assert bool((context_only.token_log_probs[~scored] == 0).all()) and int(context_only.num_tokens) == 7


@pytest.mark.parametrize("sentence_end", ["rule", "learned"])
def test_target_log_probs_read_one_class_of_the_class_distribution(sentence_end):
    """What the loss reads per target equals the log-softmax of `class_logits` at that class, for every
    kind of row (ordinary, after "." with glued and other tokens, after a hard end, full), forbidden
    classes (-inf) and the sentence end included, with the whole vocabulary and with candidates."""
    model = tiny_sllm(sentence_end=sentence_end)
    decoder, rule = model.sentence_decoder, model.segmentation_rule
    generator = torch.Generator().manual_seed(0)
    previous = torch.tensor([-1, 12, DOT, DOT, DOT, NEWLINE, 13, 14])  # [M]
    length = torch.tensor([0, 1, 2, 2, 2, 3, 8, 4])  # row 6 is full (max_sentence_len 8)
    classes = torch.tensor([20, 21, 5, 22, VOCAB, VOCAB, VOCAB, 23])  # row 3: a non-glued token after "."
    states = torch.randn(8, 32, generator=generator)
    for candidates in (None, torch.tensor([5, 6, 20, 21, 22, 23, 40])):
        token_logits = decoder.token_logits(states, model.get_output_embeddings(), candidates)
        width = token_logits.shape[-1]
        columns = classes if candidates is None else torch.searchsorted(candidates, classes.clamp(max=VOCAB - 1))
        columns = torch.where(classes == VOCAB, width, columns)
        full = F.log_softmax(decoder.class_logits(states, token_logits, previous, length, rule, candidates), -1)
        expected = full.gather(1, columns[:, None])[:, 0]
        got = decoder.target_log_probs(states, token_logits, previous, length, rule, columns, candidates)
        assert torch.equal(got.isinf(), expected.isinf()) and torch.allclose(got, expected, atol=1e-6)
        if sentence_end == "rule":
            assert got[3].isinf() and got[5] == 0 and got[6] == 0  # a forbidden token; certain ends
