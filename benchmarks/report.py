"""Benchmark results on disk: JSON for machines, a Markdown table for the README, a PNG plot."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_results(output_dir: Path, name: str, results: dict, table: list[str], figure: plt.Figure) -> None:
    """Write `name`.json, `name`.md and `name`.png into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (output_dir / f"{name}.md").write_text("\n".join(table) + "\n")
    figure.tight_layout()
    figure.savefig(output_dir / f"{name}.png", dpi=120)
    plt.close(figure)
