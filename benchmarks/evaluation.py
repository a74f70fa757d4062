"""The shipped equal-perplexity pair scored by lm-evaluation-harness's stock `hf` model, with the same command.

Two tasks built from held-out text (the Python docs, which neither model trained on, when the shared corpora
are there): `heldout_next_sentence`, multiple choice: a paragraph's first sentences, then its true next sentence
against three sentences from other paragraphs (acc, acc_norm); `heldout_rolling`, loglikelihood_rolling over
whole paragraphs (word perplexity, bits per byte). Writes the tasks (YAML + JSONL), runs

    python -m lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True,dtype=float32 \
        --tasks heldout_next_sentence,heldout_rolling --include_path TASKS --device cpu --batch_size 8

for the SLLM and for its token-level peer, and writes benchmarks/results/evaluation/ (json, md).

    python benchmarks/evaluation.py [--documents 200] [--paragraphs 100]
"""

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import HELD_OUT_TEXT, REPO, run_header, shipped_pair

TASK_HEAD = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
TASKS = {
    "heldout_next_sentence": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{label}}"\ntarget_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    "heldout_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
    "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
}
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def build_tasks(folder: Path, documents: int, paragraphs: int, seed: int = 0) -> dict:
    """Write the two tasks' JSONL and YAML files into `folder`; returns how many documents each has."""
    lines = [line.strip() for line in HELD_OUT_TEXT.read_text().splitlines() if len(line.split()) >= 30]
    random.Random(seed).shuffle(lines)
    split = [SENTENCE.split(line) for line in lines]
    choice_docs, pool = [], [s for sentences in split[documents:] for s in sentences if 5 <= len(s.split()) <= 40]
    rng = random.Random(seed + 1)
    for sentences in split:
        if len(choice_docs) == documents:
            break
        if len(sentences) < 3 or not 5 <= len(sentences[2].split()) <= 40:
            continue
        choices = [sentences[2], *rng.sample(pool, 3)]
        order = rng.sample(range(4), 4)
        choice_docs.append({"context": " ".join(sentences[:2]), "choices": [choices[i] for i in order],
                            "label": order.index(0)})  # fmt: skip
    rolling_docs = [{"text": line} for line in lines[-paragraphs:]]
    for name, docs in (("heldout_next_sentence", choice_docs), ("heldout_rolling", rolling_docs)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + TASK_HEAD.format(data=data) + TASKS[name])
    return {"heldout_next_sentence": len(choice_docs), "heldout_rolling": len(rolling_docs)}


def run_harness(model_folder: Path, tasks: Path, output: Path) -> tuple[dict, float, list[str]]:
    """The stock lm_eval command on one model folder: its results per task, wall seconds and the command."""
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
        f"pretrained={model_folder},trust_remote_code=True,dtype=float32", "--tasks", ",".join(TASKS),
        "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8", "--output_path", str(output),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    results = json.loads(max(output.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    return results["results"], seconds, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200, help="next-sentence multiple-choice documents")
    parser.add_argument("--paragraphs", type=int, default=100, help="paragraphs for the rolling perplexity")
    parser.add_argument("--output_dir", type=Path, default=REPO / "benchmarks" / "results" / "evaluation")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tasks = args.output_dir / "tasks"
    tasks.mkdir(exist_ok=True)
    counts = build_tasks(tasks, args.documents, args.paragraphs)
    sllm, peer = shipped_pair()
    runs = {}
    for name, folder in (("SLLM", sllm), ("token LM", peer)):
        results, seconds, command = run_harness(folder, tasks, args.output_dir / "lm_eval" / folder.name)
        runs[name] = {"folder": folder.name, "results": results, "seconds": seconds,
                      "command": " ".join(command[1:]).replace(str(REPO) + "/", "")}  # fmt: skip
    record = {**run_header(torch.device("cpu")), "held_out_text": HELD_OUT_TEXT.name, "documents": counts, "runs": runs}
    (args.output_dir / "evaluation.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    rows = ["| model | next sentence acc | acc_norm | word perplexity | bits per byte | harness wall time |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, run in runs.items():
        choice, rolling = run["results"]["heldout_next_sentence"], run["results"]["heldout_rolling"]
        rows.append(
            f"| {name} (`{run['folder']}`) | {choice['acc,none']:.3f} ± {choice['acc_stderr,none']:.3f} | "
            f"{choice['acc_norm,none']:.3f} | {rolling['word_perplexity,none']:.1f} | "
            f"{rolling['bits_per_byte,none']:.3f} | {run['seconds']:.0f} s |"
        )
    table = "\n".join(rows)
    (args.output_dir / "evaluation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
