"""PEFT LoRA on an SLLM: adapter save/reload, AutoPeftModelForCausalLM, merge_and_unload, generate."""

import torch
from conftest import random_text, tiny_sllm
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

from modeling_sllm import SLLMForCausalLM
from modeling_sllm.loading import SENTENCE_MODULES


def test_adapter_round_trips_and_merge(tmp_path):
    tiny_sllm().save_pretrained(tmp_path / "base")
    model = SLLMForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = LoraConfig(r=4, target_modules=r"llm\..*\.(q_proj|v_proj)", modules_to_save=SENTENCE_MODULES,
                        task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config).eval()
    ids = random_text(2, 30)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: the saved copies of the sentence modules move
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name and param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    without_lora = peft_model(input_ids=ids, labels=ids).sentence_losses
    with torch.no_grad():  # and LoRA B, which starts at 0: until it moves, the adapter adds nothing to compare
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5 * torch.randn_like(param))
    expected = peft_model(input_ids=ids, labels=ids).sentence_losses
    generated = peft_model.generate(input_ids=ids, max_new_tokens=12)
    assert not torch.allclose(expected, without_lora, atol=1e-3)  # the LoRA weights themselves change the outputs
    base_losses = SLLMForCausalLM.from_pretrained(tmp_path / "base").eval()(input_ids=ids, labels=ids).sentence_losses
    assert not torch.allclose(expected, base_losses, atol=1e-3)
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(
        SLLMForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    assert torch.allclose(reloaded(input_ids=ids, labels=ids).sentence_losses, expected, atol=1e-5)
    assert torch.equal(reloaded.generate(input_ids=ids, max_new_tokens=12), generated)

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    assert torch.allclose(auto(input_ids=ids, labels=ids).sentence_losses, expected, atol=1e-5)

    merged = reloaded.merge_and_unload()
    assert type(merged) is SLLMForCausalLM
    merged.save_pretrained(tmp_path / "merged")
    loaded = SLLMForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(loaded(input_ids=ids, labels=ids).sentence_losses, expected, atol=1e-4)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12), generated)
