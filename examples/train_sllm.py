"""Train an SLLM with Trainer: Sentence-VAE reconstruction (stage 1), next-sentence LM (stage 2), or both.

    python examples/train_sllm.py --output_dir runs/sllm --stage both --max_steps 2000
    accelerate launch --num_processes 2 examples/train_sllm.py ...   # same script, several processes

Base model: any Hub id or local path (`--base_model`), default the embedded SmolLM2-135M.
Data: local text files (one document per line, or per blank-line-separated block with
`--sample_by paragraph`) or a Hub dataset with a text column; this script defaults to
../shared/data/linux-docs.txt (train) and python-docs.txt (held-out) when present, else the
Python-docs excerpt shipped in examples/data. Without a held-out file, 10% of the training
documents are held out. The code is `modeling_sllm.training`; `--help` lists every option.
"""

import sys
from pathlib import Path

from modeling_sllm.training import main

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TRAIN_TEXT, HELD_OUT_TEXT = SHARED_DATA / "linux-docs.txt", SHARED_DATA / "python-docs.txt"
EXCERPT = REPO / "examples" / "data" / "python-docs-excerpt.txt"


def default_data(argv: list[str]) -> list[str]:
    """The options naming this script's default data, for a command line without --train_file or
    --dataset_name: the shared corpora beside the repository when present, else the shipped excerpt."""
    given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    if given & {"train_file", "dataset_name"}:
        return []
    if not (TRAIN_TEXT.exists() and HELD_OUT_TEXT.exists()):
        return ["--train_file", str(EXCERPT)]
    return ["--train_file", str(TRAIN_TEXT)] + ([] if "eval_file" in given else ["--eval_file", str(HELD_OUT_TEXT)])


if __name__ == "__main__":
    main([*default_data(sys.argv[1:]), *sys.argv[1:]])  # the command line's own options come last, so they win
