"""Train an SLLM with Trainer: Sentence-VAE reconstruction (stage 1), next-sentence LM (stage 2), or both.

    python examples/train_sllm.py --output_dir runs/sllm --stage both --max_steps 2000
    accelerate launch --num_processes 2 examples/train_sllm.py ...   # same script, several processes

Base model: any Hub id or local path (`--base_model`), default the embedded SmolLM2-135M.
Data: local text files (one document per line, or per blank-line-separated block with
`--sample_by paragraph`) or a Hub dataset with a text column; defaults to
../shared/data/linux-docs.txt (train) and python-docs.txt (held-out) when present, else the
Python-docs excerpt shipped in examples/data. Without a held-out file, 10% of the training
documents are held out. The code is `modeling_sllm.training`; `--help` lists every option.
"""

from modeling_sllm.training import main

if __name__ == "__main__":
    main()
