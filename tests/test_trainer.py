"""Trainer really steps the model; gradient accumulation equals the full batch; PEFT LoRA wraps it."""

import torch
from conftest import PAD, random_text, tiny_sllm
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from modeling_sllm import SENTENCE_MODULES


def dataset(n: int = 8):
    rows = [random_text(1, 12 + 3 * i, seed=i)[0] for i in range(n)]
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), PAD)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = f["input_ids"]
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, tmp_path, max_steps: int = 1, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_steps=max_steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        **kwargs,
    )
    Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate).train()
    return model


def test_trainer_gradient_accumulation_equals_full_batch(tmp_path):
    before = tiny_sllm().state_dict()
    full = train(tiny_sllm().train(), tmp_path / "a", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc = train(tiny_sllm().train(), tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    changed = 0
    for (name, a), b in zip(full.state_dict().items(), acc.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
        changed += not torch.equal(a, before[name])
    assert changed > 10  # the step really moved the weights


def test_lora_on_backbone_with_sentence_modules_trained(tmp_path):
    model = tiny_sllm().train()
    config = LoraConfig(
        r=4,
        target_modules=r"llm\..*\.(q_proj|v_proj)",
        modules_to_save=SENTENCE_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("sentence_decoder" in n for n in trainable)
    assert any("start_embedding" in n for n in trainable)
    train(peft_model, tmp_path, max_steps=2, per_device_train_batch_size=2)

    after = dict(peft_model.named_parameters())
    frozen = before.keys() - trainable  # the backbone and the original copies of the sentence modules
    assert any(n.startswith("base_model.model.llm.") for n in frozen)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    moved = {n for n in trainable if not torch.equal(after[n], before[n])}
    assert all(n in moved for n in trainable if "lora_B" in n)  # B starts at 0: the first step moves it
    assert any("lora_A" in n for n in moved)  # the second one moves A through B
    for module in SENTENCE_MODULES:
        assert any(n.startswith(f"base_model.model.{module}.modules_to_save.") for n in moved), module
