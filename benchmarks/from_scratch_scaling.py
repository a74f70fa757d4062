"""Where the from-scratch frontiers go with more compute: a power law per model through its final held-out
perplexities at several budgets, extrapolated to 10x and 100x the largest (issue 21).

    python benchmarks/from_scratch_scaling.py     # the budgets in benchmarks/results/scratch{,-15min,-headline}
    python benchmarks/from_scratch_scaling.py --results DIR DIR ... --sllm NAME --token NAME --output-dir DIR

Each budget is its own run of the pinned model (benchmarks/from_scratch_study.py, the same variant, settings and
held-out rows), trained with a learning-rate schedule that anneals over that budget, so each point is what
that much compute buys. The curves inside one run are not used: their early points are taken mid-schedule
at a high learning rate and would bend the fit. Fit: log perplexity = c - k log minutes, least squares over
the budgets; with three budgets the residuals say how well a power law holds over this range. A power law
has no floor (irreducible loss), so extrapolated perplexities are optimistic for both families alike; the
ratio between the families is the figure to read, and the crossover, if the exponents differ, is where the
fitted lines meet. Compute is training wall-clock minutes of one CPU thread on this machine: both families
got the same minutes per budget, so equal minutes are equal compute here.
Writes benchmarks/results/scratch-scaling/scaling.{json,md,png} (--output-dir).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from measure import save_results, two_panels

RESULTS = Path(__file__).parent / "results"
DEFAULT_RESULTS = [RESULTS / "scratch", RESULTS / "scratch-15min", RESULTS / "scratch-headline"]
SPLITS = ("in_domain", "out_of_domain")


def budget_points(result_dirs: list[Path], name: str) -> list[dict]:
    """The model's (training minutes, final perplexities, batch-1 tok/s) in every results folder that has it."""
    points = []
    for folder in result_dirs:
        models = json.loads((folder / "scratch.json").read_text())["models"]
        if name in models:
            m = models[name]
            points.append({"results": folder.name, "minutes": m["train_minutes"], **m["perplexity"],
                           "tok_s_batch1": m["speed"]["batch 1"]["tok_s"]})  # fmt: skip
    if len(points) < 2:
        raise SystemExit(f"{name!r} is in {len(points)} of {[str(f) for f in result_dirs]}: a fit needs 2 or more")
    return sorted(points, key=lambda p: p["minutes"])


def paired_ratios(points: dict, split: str) -> dict[str, tuple[float, float]]:
    """{results folder: (minutes, SLLM / token perplexity)} for the budgets both models were run at."""
    token = {p["results"]: p for p in points["token"]}
    return {p["results"]: (p["minutes"], p[split] / token[p["results"]][split]) for p in points["sllm"]
            if p["results"] in token and math.isclose(p["minutes"], token[p["results"]]["minutes"], rel_tol=0.05)}  # fmt: skip


def power_law(points: list[dict], split: str) -> dict:
    """log perplexity = c - k log minutes through the points; k, c and the largest residual (as a factor)."""
    x = np.log([p["minutes"] for p in points])
    y = np.log([p[split] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.max(np.abs(y - (intercept + slope * x))))
    return {"exponent": float(-slope), "intercept": float(intercept), "max_residual_factor": math.exp(residual)}


def at(fit: dict, minutes: float) -> float:
    return math.exp(fit["intercept"] - fit["exponent"] * math.log(minutes))


def crossover_minutes(sllm: dict, token: dict) -> float | None:
    """Minutes where the fitted lines meet (None if parallel); before or after the measured budgets alike."""
    if math.isclose(sllm["exponent"], token["exponent"]):
        return None
    return math.exp((sllm["intercept"] - token["intercept"]) / (sllm["exponent"] - token["exponent"]))


def trend(fits: dict, largest: float) -> str:
    """In words: where the fitted lines go beyond the measured budgets."""
    cross = crossover_minutes(fits["sllm"], fits["token"])
    if cross is None:
        return "parallel: the ratio stays"
    if fits["sllm"]["exponent"] < fits["token"]["exponent"]:
        return "the gap widens with compute"
    return f"the SLLM catches up at {cross:,.0f} min" if cross > largest else f"the SLLM leads from {cross:,.0f} min"


def compute_multiplier(sllm: dict, token: dict, minutes: float) -> float:
    """How many times the token LM's minutes the SLLM needs (fitted) to reach the token LM's perplexity there."""
    target = math.log(at(token, minutes))
    return math.exp((sllm["intercept"] - target) / sllm["exponent"]) / minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="+", default=DEFAULT_RESULTS,
                        help="folders with a scratch.json, one per budget")  # fmt: skip
    parser.add_argument("--sllm", default="SLLM 192x5, decoder 1 layer")
    parser.add_argument("--token", default="token LM 192x5")
    parser.add_argument("--output-dir", type=Path, default=RESULTS / "scratch-scaling")
    args = parser.parse_args()

    points = {"sllm": budget_points(args.results, args.sllm), "token": budget_points(args.results, args.token)}
    largest = max(p["minutes"] for p in points["sllm"] + points["token"])
    horizons = {"measured": largest, "10x": 10 * largest, "100x": 100 * largest}
    results = {"sllm": args.sllm, "token": args.token, "points": points, "fits": {}, "results": [str(r) for r in args.results]}
    table = [
        f"Final held-out perplexity of {args.sllm!r} and its equal-compute peer {args.token!r} at each training "
        f"budget (one run per budget, benchmarks/from_scratch_study.py), a power law per model and split through "
        f"them, extrapolated to 10x and 100x the largest budget ({largest:.0f} minutes of one CPU thread).",
        "",
        "| split | model | budgets (min: ppl) | exponent k | largest residual | "
        + " | ".join(f"ppl at {h} ({m:.0f} min)" for h, m in horizons.items()) + " |",
        "|---|---|---|---|---|" + "---|" * len(horizons),
    ]
    for split in SPLITS:
        fits = {family: power_law(points[family], split) for family in points}
        ratios = {h: at(fits["sllm"], m) / at(fits["token"], m) for h, m in horizons.items()}
        results["fits"][split] = fits | {
            "ratio_sllm_to_token": ratios,
            "measured_ratios": {name: ratio for name, (_, ratio) in paired_ratios(points, split).items()},
            "crossover_minutes": crossover_minutes(fits["sllm"], fits["token"]),
            "sllm_compute_multiplier": {h: compute_multiplier(fits["sllm"], fits["token"], m)
                                        for h, m in horizons.items()},  # fmt: skip
        }
        for family, name in (("sllm", args.sllm), ("token", args.token)):
            fit = fits[family]
            budgets = ", ".join(f"{p['minutes']:.0f}: {p[split]:.1f}" for p in points[family])
            table.append(f"| {split.replace('_', ' ')} | {name} | {budgets} | {fit['exponent']:.3f} "
                         f"| {fit['max_residual_factor']:.3f}x | "
                         + " | ".join(f"{at(fit, m):.1f}" for m in horizons.values()) + " |")  # fmt: skip
        table.append(f"| {split.replace('_', ' ')} | SLLM / token (fitted) | {trend(fits, largest)} | | | "
                     + " | ".join(f"{r:.2f}x" for r in ratios.values()) + " |")  # fmt: skip
        table.append(f"| {split.replace('_', ' ')} | SLLM minutes for the token LM's perplexity | | | | "
                     + " | ".join(f"{v:.1f}x" for v in results["fits"][split]["sllm_compute_multiplier"].values())
                     + " |")  # fmt: skip

    fig, left, right = two_panels(
        "From scratch: final held-out perplexity against training budget, fitted and extrapolated",
        ("training minutes (one CPU thread)", "training minutes (one CPU thread)"),
        ("perplexity per text token (in domain)", "SLLM / token LM perplexity"),
    )
    grid = np.geomspace(min(p["minutes"] for p in points["token"]) / 2, horizons["100x"], 50)
    fits = results["fits"]["in_domain"]
    for family, name, colour in (("sllm", args.sllm, "tab:orange"), ("token", args.token, "tab:blue")):
        left.scatter([p["minutes"] for p in points[family]], [p["in_domain"] for p in points[family]], color=colour,
                     label=f"{name} (measured)")  # fmt: skip
        left.plot(grid, [at(fits[family], m) for m in grid], "--", color=colour, label=f"{name} (power law)")
    for split, style in (("in_domain", "-"), ("out_of_domain", ":")):
        f = results["fits"][split]
        right.plot(grid, [at(f["sllm"], m) / at(f["token"], m) for m in grid], style, color="black",
                   label=f"fitted, {split.replace('_', ' ')}")  # fmt: skip
        right.scatter(*zip(*paired_ratios(points, split).values()), color="black", marker="o" if split == "in_domain" else "x")
    right.axhline(1.0, color="grey", lw=0.5)
    right.axhline(1.1, color="grey", lw=0.5, ls="--", label="1.1x (the issue's target)")
    for ax in (left, right):
        ax.set_xscale("log")
        for h in ("10x", "100x"):
            ax.axvline(horizons[h], color="grey", lw=0.5, ls=":")
        ax.legend(fontsize=6)
    left.set_yscale("log")
    save_results(args.output_dir, "scaling", results, table, fig)
    print("\n".join(table))
    print(f"-> {args.output_dir}")


if __name__ == "__main__":
    main()
