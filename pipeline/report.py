"""`report.md`: the recipe, per-stage status, timings and metrics, and a plot of each stage's curves."""

from __future__ import annotations

import json
from pathlib import Path

CURVE_KEYS = ("loss", "eval_loss", "grad_norm", "learning_rate")


def plot_curves(history: list[dict], out: Path, title: str) -> bool:
    """One PNG with a panel per logged quantity; False if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVE_KEYS if any(k in row for row in history)]
    keys += sorted({k for row in history for k in row
                    if k.startswith(("rewards/", "reward", "kl", "objective/", "eval_accuracy")) and k not in keys})
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if key in row and "step" in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return True


def write_report(run_dir: Path) -> Path:
    """Rebuild `report.md` (and `plots/`) from what the run directory holds."""
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# Run report: {summary['recipe']}", "", f"Recipe: `{summary['recipe_path']}`, seed {manifest['seed']}.",
             "", "| stage | type | status | seconds | key metrics |", "|---|---|---|---|---|"]
    for name, stage in summary["stages"].items():
        seconds = manifest["stage_seconds"].get(name, "")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(stage["metrics"].items())[:6])
        lines.append(f"| {name} | {stage['type']} | {stage['status']} | {seconds} | {shown} |")
    for name, stage in summary["stages"].items():
        history_file = run_dir / name / "log_history.json"
        if not history_file.is_file():
            continue
        png = plots / f"{name}.png"
        if plot_curves(json.loads(history_file.read_text()), png, f"{name} ({stage['type']})"):
            lines += ["", f"## {name}", "", f"![{name} curves](plots/{png.name})"]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
