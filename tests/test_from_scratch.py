"""From scratch: a random Llama token LM and an SLLM around one, trained with Trainer, saved with their tokenizer
and loaded as remote code by a fresh process; the analytic multiply-adds match a counted forward step."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_fresh, shipped_pair, shipped_pair_record
from datasets import Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import DataCollatorForLanguageModeling, DynamicCache, Trainer, TrainingArguments

from modeling_sllm import SLLMConfig, SLLMForCausalLM
from modeling_sllm.from_scratch import (
    build_scratch_sllm,
    build_scratch_token_lm,
    multiply_adds_per_token,
    scratch_llama_config,
)
from modeling_sllm.tokenizer_training import train_bpe_tokenizer
from modeling_sllm.training import SLLMTrainer

EXCERPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TEXT = (
    "The kernel reads the file. It writes the answer to the log; then it stops.\n"
    "A module is loaded at boot. The driver probes the device and registers it."
)

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, text = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "modeling_sllm" not in sys.modules and type(model).__module__.startswith("transformers_modules")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # the folder's config is remote code
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        new = model.generate(ids[:, :12], max_new_tokens=10, do_sample=False)
    print(json.dumps({"loss": float(loss), "generated": new[0].tolist(), "eos": tokenizer.eos_token_id}))
    """
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(EXCERPT.read_text().splitlines()[:200] + [TEXT], vocab_size=400)


def rows(tokenizer, count: int = 16) -> Dataset:
    ids = tokenizer(TEXT).input_ids
    return Dataset.from_dict({"input_ids": [ids] * count})


def text_loss(model, tokenizer) -> float:
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def train(model, tokenizer, trainer_class, tmp_path, steps: int = 20):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", max_steps=steps,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=2, remove_unused_columns=False,
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer_class(model=model, args=args, train_dataset=rows(tokenizer), data_collator=collator).train()
    return model.eval()


def test_scratch_configs_follow_the_tokenizer(tokenizer):
    config = scratch_llama_config(TINY, tokenizer)
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert scratch_llama_config({"hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 8},
                                tokenizer).intermediate_size == 688  # fmt: skip
    sllm = build_scratch_sllm(TINY, tokenizer, decoder_layers=2)
    assert sllm.config.sentence_init == "random" and sllm.config.decoder_layers == 2
    assert tokenizer.eos_token_id in sllm.config.sentence_end_token_ids
    assert sllm.generation_config.eos_token_id == tokenizer.eos_token_id
    frozen = [n for n, p in sllm.named_parameters() if not p.requires_grad]
    assert frozen == [], frozen  # everything trains, the backbone included
    with pytest.raises(ValueError, match="sentence_init"):
        build_scratch_sllm(TINY, tokenizer, sentence_init="backbone")
    with pytest.raises(ValueError, match="tokenizer"):
        scratch_llama_config(TINY | {"vocab_size": 10}, tokenizer)


def test_token_lm_trains_with_trainer(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_scratch_token_lm(TINY, tokenizer)
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        before = float(model.eval()(input_ids=ids, labels=ids).loss)
    train(model.train(), tokenizer, Trainer, tmp_path)
    with torch.no_grad():
        after = float(model(input_ids=ids, labels=ids).loss)
    assert after < 0.6 * before, (before, after)


def test_scratch_sllm_trains_saves_and_reloads_as_remote_code(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_scratch_sllm(TINY, tokenizer, max_sentence_len=32, sentence_dropout=0.0)
    before = text_loss(model, tokenizer)
    train(model.train(), tokenizer, SLLMTrainer, tmp_path)
    after = text_loss(model, tokenizer)
    assert after < 0.6 * before, (before, after)

    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert {"modeling_sllm.py", "tokenizer.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"] == len(tokenizer)
    stdout = run_fresh(LOAD_SCRIPT, str(folder), TEXT, tmp_path=tmp_path)
    out = json.loads(stdout.splitlines()[-1])
    assert out["loss"] == pytest.approx(after, abs=1e-5)
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        expected = model.generate(ids[:, :12], max_new_tokens=10, do_sample=False)
    assert out["generated"] == expected[0].tolist()
    assert SLLMForCausalLM.from_pretrained(folder).config.decoder_context_norm


@torch.no_grad()
def counted_multiply_adds(model, step, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as counter:
        step(*args, **kwargs)
    return counter.get_total_flops() / 2


def test_token_lm_multiply_adds_match_a_counted_decode_step(tokenizer):
    # eager attention: the flop counter does not see the CPU sdpa kernel's work
    model = build_scratch_token_lm(TINY | {"num_key_value_heads": 2, "attn_implementation": "eager"}, tokenizer).eval()
    context = 20
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 400, (1, context - 1)), cache=cache, use_cache=True)
    counted = counted_multiply_adds(model, model, input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
    analytic = multiply_adds_per_token(model.config, context)
    assert analytic["total"] == pytest.approx(counted, rel=1e-6)
    assert 0 < analytic["output_projection_share"] < 1


def test_sllm_multiply_adds_amortise_per_sentence_costs(tokenizer):
    config = SLLMConfig(text_config=scratch_llama_config(TINY, tokenizer), sentence_init="random")
    short, long = (multiply_adds_per_token(config, 256, length) for length in (5, 50))
    assert short["backbone"] > 5 * long["backbone"]  # one backbone step per sentence
    assert long["total"] < short["total"]
    token_lm = multiply_adds_per_token(config.text_config, 256)
    wide = SLLMConfig(text_config=config.text_config, sentence_init="random", decoder_layers=3, decoder_window=16)
    assert multiply_adds_per_token(wide, 256, 25)["decoder"] > long["decoder"]
    assert long["output_projection"] == pytest.approx(token_lm["output_projection"] * 51 / 50)
    with pytest.raises(ValueError, match="tokens_per_sentence"):
        multiply_adds_per_token(config, 256)


def test_training_script_trains_from_scratch(tmp_path):
    """--base_config llama: the script trains a BPE on the training texts, builds a random Llama backbone of the
    given sizes with that vocabulary, trains everything (--backbone full) and saves the model with its tokenizer."""
    from modeling_sllm import training

    lines = EXCERPT.read_text().splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines[:150]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines[-20:]) + "\n")
    out = tmp_path / "run"
    args = ["--base_config", "llama", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads",
            "4", "--num_key_value_heads", "2", "--tokenizer_vocab_size", "300", "--backbone", "full",
            "--sentence_dropout", "0", "--stage", "next_sentence", "--max_steps", "30", "--learning_rate", "1e-2",
            "--train_file", str(tmp_path / "train.txt"), "--eval_file", str(tmp_path / "eval.txt"),
            "--output_dir", str(out), "--use_cpu", "--per_device_train_batch_size", "8", "--block_size", "64",
            "--max_eval_samples", "16", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
    torch.manual_seed(0)
    metrics = training.main(args)
    assert metrics["base_model"] == "llama 32x2 from scratch"
    # a random model's perplexity is about the vocabulary size; 30 steps must have learned far more than that
    assert metrics["stages"]["next_sentence"]["eval_perplexity"] < 0.4 * 300
    model, tokenizer, _ = training.load_sllm(out)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (32, 2, 2)
    assert text.vocab_size == len(tokenizer) == 300 and model.config.sentence_init == "random"
    assert (out / "tokenizer.json").exists()
    again = train_bpe_tokenizer((tmp_path / "train.txt").read_text().splitlines(), vocab_size=300)
    assert again.get_vocab() == tokenizer.get_vocab()  # a resumed run trains the same tokenizer


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base_config", "llama", "--backbone", "full", "--hidden_size", "32", "--num_hidden_layers", "2"],
         "needs --num_attention_heads"),
        (["--base_config", "llama", "--backbone", "frozen"], "must train: pass --backbone full"),
        (["--base_config", "llama", "--backbone", "full", "--init_from", "x"], "cannot be combined with --init_from"),
        (["--base_config", "llama", "--backbone", "full", "--base_model", "gpt2"], "drop --base_model"),
        (["--hidden_size", "32"], r"--hidden_size only apply to a backbone trained from scratch"),
    ],
)
def test_scratch_options_are_checked(tmp_path, extra, message):
    from modeling_sllm import training

    common = ["--train_file", str(EXCERPT), "--output_dir", str(tmp_path / "x"), "--max_steps", "2", "--use_cpu"]
    with pytest.raises(ValueError, match=message):
        training.main([*common, *extra])


SHIPPED_PAIR_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sllm_folder, peer_folder, text = sys.argv[1:4]
    sllm = AutoModelForCausalLM.from_pretrained(sllm_folder, trust_remote_code=True).eval()
    peer = AutoModelForCausalLM.from_pretrained(peer_folder).eval()
    assert "modeling_sllm" not in sys.modules and type(sllm).__module__.startswith("transformers_modules")
    tokenizer = AutoTokenizer.from_pretrained(peer_folder)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        out = {name: model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
               for name, model in (("sllm", sllm), ("peer", peer))}
    out["types"] = [type(sllm).__name__, type(peer).__name__]
    print(json.dumps(out))
    """
)


def test_shipped_scratch_pair_loads_as_remote_code_and_matches_its_pinned_variants(tmp_path):
    """checkpoints/scratch-*: the from-scratch SLLM and its token-level peer (the equal-perplexity pair of
    docs/study-scratch.md) load in a fresh process, share one tokenizer and are the configurations pinned
    in benchmarks/variants/scratch.json."""
    root = Path(__file__).resolve().parents[1]
    sllm_folder, peer_folder = shipped_pair()
    study = json.loads((root / "benchmarks" / "variants" / "scratch.json").read_text())
    names = shipped_pair_record()
    pinned = next(v for v in study["variants"] if v["name"] == names["sllm"]["variant"])
    peer_pinned = next(v for v in study["token_lms"] if v["name"] == names["token_lm"]["variant"])
    sllm = SLLMForCausalLM.from_pretrained(sllm_folder)
    assert all(getattr(sllm.config, k) == v for k, v in pinned["config"].items() if k != "training_vocab")
    for folder, llama in ((sllm_folder, pinned["llama"]), (peer_folder, peer_pinned["llama"])):
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)
        assert all(config[k] == v for k, v in llama.items() if k != "rope_parameters"), folder
        assert (folder / "README.md").exists() and (folder / "model.safetensors").stat().st_size < 40 * 2**20
    assert (sllm_folder / "tokenizer.json").read_bytes() == (peer_folder / "tokenizer.json").read_bytes()
    out = json.loads(run_fresh(SHIPPED_PAIR_SCRIPT, str(sllm_folder), str(peer_folder), TEXT, tmp_path=tmp_path)
                     .splitlines()[-1])  # fmt: skip
    assert out["types"] == ["SLLMForCausalLM", "LlamaForCausalLM"]
    assert len(out["sllm"]) == len(out["peer"]) == 8
