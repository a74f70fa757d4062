"""Trainer really steps the model; gradient accumulation equals the full batch; PEFT LoRA wraps it."""

import pytest
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


def test_trainer_torch_compile_equals_eager_and_new_layouts_do_not_recompile(tmp_path):
    """TrainingArguments(torch_compile=True): accelerate compiles the whole SLLM; the host-side steps (segmentation,
    targets, packing) run eager and the modules between them compile, so a new sentence layout reuses the graphs
    (a frame compiles once static, once with dynamic shapes, and once more per branch: packed or padded pass,
    encoder or decoder), well under dynamo's recompile limit, and trains as eager does."""
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    class Graphs(TrainerCallback):
        def __init__(self):
            self.seen = []  # dynamo's graph count after each step

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(counters["stats"]["unique_graphs"])

    def run(folder, **kwargs):
        args = TrainingArguments(output_dir=str(tmp_path / folder), use_cpu=True, report_to="none",
                                 save_strategy="no", max_steps=STEPS, per_device_train_batch_size=2, optim="sgd",
                                 learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, **kwargs)  # fmt: skip
        graphs = Graphs()
        trainer = Trainer(model=tiny_sllm().train(), args=args, train_dataset=dataset(2 * STEPS), data_collator=collate,
                          callbacks=[graphs])  # fmt: skip
        trainer.train()
        return trainer.model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], graphs.seen

    STEPS = 10
    torch._dynamo.reset()
    counters.clear()
    eager, eager_losses, graphs = run("eager")
    assert graphs == [0] * STEPS
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a recompile per layout would raise
        compiled, compiled_losses, graphs = run("compiled", torch_compile=True)
    assert graphs[0] > 0  # it compiled
    assert graphs[-4:] == [graphs[-5]] * 4, graphs  # the last steps: new widths and sentence counts, no new graph
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
