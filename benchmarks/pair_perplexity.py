"""The shipped equal-perplexity pair's held-out perplexity, as the from-scratch study measures it (without its
runs folder): every text token scored, the SLLM's first token and end of text, the token LM's after bos and
with eos (measure.same_tokens_perplexity), on 256 x 256-token rows of the training corpus' held-out 5% (in
domain) and of the other corpus' end (out of domain).

    python benchmarks/pair_perplexity.py     # ~2 minutes on 2 CPU threads
"""

import json

import torch
from measure import HELD_OUT_TEXT, REPO, TRAIN_TEXT, corpus_lines, pack, run_header, same_tokens_perplexity, shipped_pair
from transformers import AutoModelForCausalLM, AutoTokenizer

OUTPUT = REPO / "benchmarks" / "results" / "shipped-pair-today" / "perplexity.json"

HELD_OUT_SHARE = 0.05  # the study's split of the training corpus (benchmarks/variants/scratch.json)


def main() -> None:
    torch.set_num_threads(2)
    sllm_folder, peer_folder = shipped_pair()
    tokenizer = AutoTokenizer.from_pretrained(peer_folder)  # the same tokenizer is saved in both folders
    lines = corpus_lines(TRAIN_TEXT)
    held_out = lines[round(len(lines) * (1 - HELD_OUT_SHARE)) :]
    rows = {
        "in_domain": pack(tokenizer, held_out, 256)[:256],
        "out_of_domain": pack(tokenizer, corpus_lines(HELD_OUT_TEXT), 256)[-256:],
    }
    models = {
        "SLLM": (AutoModelForCausalLM.from_pretrained(sllm_folder, trust_remote_code=True, dtype=torch.float32), None),
        "token LM": (AutoModelForCausalLM.from_pretrained(peer_folder, dtype=torch.float32), tokenizer),
    }
    result = {"header": run_header(torch.device("cpu")), "rows": {k: list(v.shape) for k, v in rows.items()}}
    for name, (model, token_lm) in models.items():
        tokens = (None, None) if token_lm is None else (token_lm.bos_token_id, token_lm.eos_token_id)
        result[name] = {k: same_tokens_perplexity(model.eval(), r.tolist(), 8, *tokens)["perplexity"] for k, r in rows.items()}
    result["ratio"] = {k: result["SLLM"][k] / result["token LM"][k] for k in rows}
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("SLLM", "token LM", "ratio")}))


if __name__ == "__main__":
    main()
