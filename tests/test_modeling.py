"""SLLMForCausalLM: construction, the loss and its definition, leak-freedom, reconstruction."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BOUNDARIES, DOT, VOCAB, left_pad, random_text, tiny_backbone, tiny_sllm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from modeling_sllm import SLLMConfig, SLLMForCausalLM
from modeling_sllm.sentence_vae import rotate


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


def test_loss_is_total_nll_over_scored_tokens():
    """Recompute the loss from its definition: every token, sentence ends and the end of text."""
    model = tiny_sllm()
    ids = torch.tensor([[10, 11, DOT, 12, 13, 14, DOT, 15]])
    out = model(input_ids=ids, labels=ids)
    seg = model.segment(ids)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    vectors = model.encode_sentences(seg.sentences[0], seg.lengths[0])
    inputs = torch.cat([model.start_embedding.weight, vectors])[None]
    states = model.llm.get_decoder()(inputs_embeds=inputs).last_hidden_state[0]
    total = 0.0
    for i, (sentence, length) in enumerate(zip(seg.sentences[0], seg.lengths[0])):
        sentence = sentence[:length]
        dec = model.sentence_decoder
        cond = dec.condition(states[i : i + 1])
        hidden = dec(cond, embed(sentence[None])).last_hidden_state[0]
        log_probs = F.log_softmax(dec.logits(hidden, lm_head), -1)
        targets = sentence.tolist() + [VOCAB]  # tokens, then the sentence end
        total -= sum(log_probs[j, t] for j, t in enumerate(targets))
        total -= F.log_softmax(model.stop_head(states[i]), -1)[0]  # "another sentence follows"
    total -= F.log_softmax(model.stop_head(states[-1]), -1)[1]  # "the text ends here"
    assert torch.allclose(out.loss, total / ids.numel(), atol=1e-5)
    assert out.num_tokens.item() == ids.numel()
    assert torch.allclose(out.sentence_losses.sum() + out.end_of_text_losses.sum(), total, atol=1e-4)


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
    model = tiny_sllm(objective="reconstruction")
    ids = random_text(2, 30)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and 0 <= out.token_accuracy <= 1 and 0 <= out.exact_match <= 1
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
    """Two halves scaled by the batch's token count (as Trainer passes it) equal the full batch."""
    ids, mask = left_pad([random_text(1, n, seed=n)[0] for n in (30, 12, 25, 7)])
    labels = ids.masked_fill(mask == 0, -100)
    full_model, acc_model = tiny_sllm().train(), tiny_sllm().train()
    full = full_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    count = (labels != -100).sum()
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
    model = tiny_sllm(objective="reconstruction", training_vocab="in_batch", sampled_negatives=0)
    ids = random_text(2, 30)
    full = model.eval()(input_ids=ids, labels=ids).loss  # eval: full vocabulary
    model.config.training_vocab = "full"
    assert torch.equal(full, model(input_ids=ids, labels=ids).loss)
    model.train().config.training_vocab = "in_batch"
    sampled = model(input_ids=ids, labels=ids)
    assert sampled.loss < full  # fewer competitors: a lower (biased) training loss
    # the logits are exactly the full logits' columns of the batch's target tokens, then the sentence end
    states, targets = torch.randn(5, 32), torch.tensor([12, 40, VOCAB, 12, 33])
    logits, classes = model.output_logits(states, targets)
    model.eval()
    full, _ = model.output_logits(states, targets)
    assert torch.allclose(logits, full[:, [12, 33, 40, VOCAB]], atol=1e-6)
    assert classes.tolist() == [0, 2, 3, 0, 1]
    sampled.loss.backward()
    assert model.sentence_decoder.end_head.weight.grad is not None


def test_sampled_negatives_join_the_batch_targets():
    model = tiny_sllm(objective="reconstruction", training_vocab="in_batch", sampled_negatives=6).train()
    states, targets = torch.randn(5, 32), torch.tensor([12, 40, VOCAB, 12, 33])
    torch.manual_seed(0)
    logits, classes = model.output_logits(states, targets)
    torch.manual_seed(0)
    candidates = torch.unique(torch.cat([torch.tensor([12, 40, 12, 33]), torch.randint(VOCAB, (6,))]))
    assert logits.shape == (5, len(candidates) + 1) and len(candidates) > 3
    model.eval()
    full, _ = model.output_logits(states, targets)
    assert torch.allclose(logits, full[:, [*candidates.tolist(), VOCAB]], atol=1e-6)
    assert candidates[classes[[0, 1, 3, 4]]].tolist() == [12, 40, 12, 33] and classes[2] == len(candidates)


def test_decoder_word_dropout_hides_teacher_forced_tokens_in_training_only():
    plain, dropped = tiny_sllm(seed=1), tiny_sllm(seed=1, decoder_word_dropout=0.5)
    ids = random_text(2, 30)
    assert torch.equal(plain(input_ids=ids, labels=ids).loss, dropped(input_ids=ids, labels=ids).loss)  # eval
    plain.train(), dropped.train()
    torch.manual_seed(0)
    reference = plain(input_ids=ids, labels=ids).loss
    torch.manual_seed(0)
    assert torch.equal(reference, plain(input_ids=ids, labels=ids).loss)  # sentence_dropout is 0: deterministic
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
