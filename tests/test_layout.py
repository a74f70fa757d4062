"""docs/design.md's layout table names every module of the package, every benchmark script and every example
script, so that a new file cannot go undocumented there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_design_notes_list_every_module_and_script():
    design = (ROOT / "docs" / "design.md").read_text()
    rows = [line for line in design.splitlines() if line.startswith("| `")]
    named = {path for row in rows for path in re.findall(r"`([\w./-]+)`", row.split(" | ")[0])}
    files = [*ROOT.glob("modeling_sllm/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.sh"),
             *ROOT.glob("examples/*.py")]  # fmt: skip
    missing = sorted(str(path.relative_to(ROOT)) for path in files if str(path.relative_to(ROOT)) not in named)
    assert not missing, f"docs/design.md's layout table does not name {missing}: add a row for each"
