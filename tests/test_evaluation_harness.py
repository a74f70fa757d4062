"""lm-evaluation-harness on an SLLM: its stock `hf` model on the folder (issue 32), and its `local-completions` model
on the SLLM served by `sllm-serve` (issue 39: `echo` and `logprobs`). The `lm_eval` command, in a fresh process,
runs loglikelihood (multiple choice and greedy checks), loglikelihood_rolling and generate_until tasks from local
JSONL files, and its numbers are the model's own."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import shipped_pair
from transformers import AutoModelForCausalLM, AutoTokenizer

DOCS = [
    {"context": "The kernel loads the driver.", "choices": [" Then it calls the probe function.", " Bananas are sweet."],
     "label": 0, "text": "The kernel loads the driver. Then it calls the probe function for each device."},
    {"context": "Python has lists and tuples.", "choices": [" The moon is far away.", " A list can be changed."],
     "label": 1, "text": "Python has lists and tuples. A list can be changed; a tuple cannot be changed."},
]  # fmt: skip
COMMON = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
TASKS = {
    "sllm_choice": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{label}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n',
    "sllm_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "sllm_greedy": 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{greedy}}"\n'
    'target_delimiter: ""\nmetric_list:\n  - metric: acc\n',
    "sllm_until": 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{text}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n',
}


def split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as the harness makes them: the whole text encoded, then cut after the
    context's tokens (no special tokens)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = len(tokenizer(context, add_special_tokens=False).input_ids)
    return whole[:head], whole[head:]


def log_likelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """What a causal LM's logits say of `continuation` after `context`: its log-likelihood and whether each of
    its tokens is the argmax."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits[0, len(context) - 1 : -1].float(), -1)
    target = torch.tensor(continuation)
    return float(log_probs.gather(1, target[:, None]).sum()), bool((log_probs.argmax(-1) == target).all())


@pytest.mark.parametrize("harness_model", ["hf", "local-completions"])
def test_the_stock_harness_scores_an_sllm(tmp_path, harness_model):
    """`hf` reads the folder's logits; `local-completions` asks the served SLLM for echoed prompts' logprobs (and
    its greedy completions): the same numbers either way."""
    folder, _ = shipped_pair()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    for doc in DOCS:  # the model's own most likely next token: is_greedy must say so
        context = tokenizer(doc["context"], add_special_tokens=False).input_ids
        with torch.no_grad():
            best = int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())
        doc["greedy"] = tokenizer.decode([best])
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    for name, body in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body)
    command = [
        sys.executable, "-m", "lm_eval", "--tasks", ",".join(TASKS), "--include_path", str(tmp_path),
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    if harness_model == "hf":
        command += ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
                    "--device", "cpu", "--batch_size", "2"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    else:
        from test_serving import Server

        server = Server(folder, tmp_path, "--continuous-batching", "--trust-remote-code")
        try:
            command += ["--model", "local-completions", "--model_args",
                        f"base_url={server.url}/v1/completions,model={folder},tokenizer={folder},"
                        "tokenizer_backend=huggingface,trust_remote_code=True,max_retries=1", "--batch_size", "1"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        finally:
            server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {
        name: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{name}_*.jsonl")).open()]
        for name in TASKS
    }
    for sample in samples["sllm_choice"]:  # each choice's log-likelihood is the one the logits give
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["filtered_resps"]):
            expected, _ = log_likelihood(model, *split(tokenizer, doc["context"], choice))
            assert abs(float(response[0]) - expected) < 1e-3 * abs(expected)
    assert all(sample["filtered_resps"][0][1] in (True, "True") for sample in samples["sllm_greedy"])
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for sample in samples["sllm_rolling"]:  # the whole text after the harness's prefix token (bos, else eos)
        ids = tokenizer(sample["doc"]["text"], add_special_tokens=False).input_ids
        expected, _ = log_likelihood(model, [prefix], ids)
        assert abs(float(sample["filtered_resps"][0]) - expected) < 1e-3 * abs(expected)
    for sample in samples["sllm_until"]:  # what generate writes, greedy, cut at the newline
        ids = tokenizer(sample["doc"]["context"], add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            written = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
        text = tokenizer.decode(written, skip_special_tokens=True).split("\n")[0]
        assert sample["filtered_resps"][0] == text
