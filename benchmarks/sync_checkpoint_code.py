"""Copy the package's remote code into the shipped checkpoints again, so their copies stay the package's files.

A checkpoint saved by `save_pretrained` carries, for `trust_remote_code=True`, the module of each class its
config.json's `auto_map` names and every module those import relatively, transitively (Transformers'
`custom_object_save`, whose file list `get_relative_import_files` gives). When the package changes, run

    python benchmarks/sync_checkpoint_code.py checkpoints/

(a folder of checkpoints, or checkpoint folders): it copies those files from modeling_sllm/ into every
checkpoint that has an auto_map, deletes the .py copies no longer among them, and prints what changed.
tests/test_checkpoint_code.py fails while a shipped copy is stale. The checkpoints are the repository's, not
the installed package's, so this script lives beside the benchmarks that write them (from_scratch_study.py export).
"""

import argparse
import filecmp
import json
import shutil
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "modeling_sllm"


def remote_code_files(checkpoint: Path, package: Path = PACKAGE) -> list[Path]:
    """The package files a checkpoint's remote code needs: the modules its auto_map names and every module
    they import relatively, as `save_pretrained` copies them."""
    auto_map = json.loads((checkpoint / "config.json").read_text()).get("auto_map", {})
    modules = sorted({package / f"{reference.split('.')[0]}.py" for reference in auto_map.values()})
    missing = [module.name for module in modules if not module.exists()]
    if missing:
        raise FileNotFoundError(f"{checkpoint}/config.json's auto_map names {missing}, which {package} lacks")
    return sorted({*modules, *(Path(file) for module in modules for file in get_relative_import_files(module))})


def stale_code(checkpoint: Path, package: Path = PACKAGE) -> list[str]:
    """What keeps a checkpoint's remote code from being the package's: files missing, differing, or no longer
    needed (each named); empty when the copies are current."""
    needed = {file.name for file in remote_code_files(checkpoint, package)}
    shipped = {file.name for file in checkpoint.glob("*.py")}
    differing = [name for name in sorted(needed & shipped)
                 if not filecmp.cmp(package / name, checkpoint / name, shallow=False)]  # fmt: skip
    return (
        [f"{name} is missing" for name in sorted(needed - shipped)]
        + [f"{name} differs from {package.name}/{name}" for name in differing]
        + [f"{name} is no longer part of the remote code" for name in sorted(shipped - needed)]
    )


def code_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints with remote code (an auto_map in config.json): `folder` itself, or its subfolders."""
    candidates = [folder] if (folder / "config.json").exists() else sorted(folder.iterdir())
    configs = [(checkpoint, checkpoint / "config.json") for checkpoint in candidates]
    return [checkpoint for checkpoint, config in configs
            if config.is_file() and "auto_map" in json.loads(config.read_text())]  # fmt: skip


def sync(checkpoint: Path, package: Path = PACKAGE) -> list[str]:
    """Make a checkpoint's remote code the package's (copy what is needed, delete the other .py copies);
    returns what was stale."""
    stale = stale_code(checkpoint, package)
    needed = {file.name: file for file in remote_code_files(checkpoint, package)}
    for copy in checkpoint.glob("*.py"):
        if copy.name not in needed:
            copy.unlink()
    for name, file in needed.items():
        shutil.copyfile(file, checkpoint / name)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="a folder of checkpoints, or checkpoint folders")
    for folder in parser.parse_args().folders:
        for checkpoint in code_checkpoints(folder):
            stale = sync(checkpoint)
            print(f"{checkpoint}: " + ("; ".join(stale) + " -> synced" if stale else "up to date"))


if __name__ == "__main__":
    main()
