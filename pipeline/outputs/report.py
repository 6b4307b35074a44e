"""`report.md`: a headline table (each stage's key metric before -> after, and its run-health verdict) with a chart of held-out accuracy
across the eval stage's models (greedy, best-of-N, pass@k), then per-stage launches, metrics, training curves
(and the curves behind each health finding), eval results and samples, the recipe and package versions.

Everything is rebuilt from the run directory (summary.json, manifest.json, each stage's log_history.json,
result.json and an eval stage's samples.json), so `pipeline report RUN_DIR` works on any run, finished or not.
Plots are PNGs in `plots/`; the plotting functions return the data they drew, read back from the figure, and a
plot whose data has not changed since it was drawn is not drawn again (`drawn_once`).
"""

from __future__ import annotations

import hashlib
import json
import re
import math
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.outputs.health import recipe_settings, stage_findings
from pipeline.runtime.disk import disk_use, megabytes
from pipeline.runtime.distributed import launch_label
from pipeline.runtime.files import write_json
from pipeline.training.health import Finding, verdict
from pipeline.stages import STAGE_TYPES
from pipeline.stages.specs.eval import sampled_name

# Logged quantities worth a curve, by their last name part (an `eval_` prefix shares the train panel):
# losses, reward-model and DPO accuracies/margins, RL rewards, KL, and response length (reward hacking shows there).
CURVE_NAMES = ("loss", "accuracy", "accuracies", "margin", "margins", "reward", "kl", "mean_length")
EVAL_FAMILIES = ("accuracy", "reward", "win_rate", "kl", "perplexity", "judge", "env_reward", "tool_calls",
                 "tool_malformed", "tool_errors")
PANEL_INCHES, DPI = (4.0, 3.0), 80
# Per stage type, the numbers that say whether it worked: (label, metric before training or None, after).
# `*` matches any metric name (PPO's `eval_reward/<term>`); its `initial_` twin is the before.
Series = dict[str, list[tuple[float, float]]]


def curve_keys(history: list[dict]) -> dict[str, list[str]]:
    """Panels (train/eval pairs grouped) of the numeric logged keys worth plotting, in first-logged order."""
    panels: dict[str, list[str]] = {}
    for row in history:
        for key, value in row.items():
            if not isinstance(value, (int, float)) or key.startswith("train_"):  # train_*: one end-of-run number
                continue
            base = key.removeprefix("eval_")
            if base.split("/")[-1] in CURVE_NAMES or (base.startswith("rewards/") and base.endswith("/mean")):
                panels.setdefault(base, [])
                if key not in panels[base]:
                    panels[base].append(key)
    return panels


def _figure(panels: int):
    import matplotlib  # lazy: a report whose plots are up to date draws none, and matplotlib takes a second

    matplotlib.use("Agg")  # plots are written to files, never shown (the run may have no display)
    import matplotlib.pyplot as plt  # lazy: see above

    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:panels])


def _save(plt, fig, out: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)


def drawn_once(plot: Callable[..., Any], out: Path, title: str, *data: Any) -> Any:
    """`plot(*data, out, title)`, unless `out` already shows exactly that (same data, title, plotting code and
    matplotlib): then what it drew, as recorded in `plots/.drawn.json`. Rebuilding a report redraws only what
    changed."""
    records_path = out.parent / ".drawn.json"
    records = _read(records_path) or {}
    try:
        matplotlib_version = metadata.version("matplotlib")
    except metadata.PackageNotFoundError:
        matplotlib_version = None
    key = hashlib.sha256(json.dumps([plot.__name__, data, title, matplotlib_version, Path(__file__).read_text()],
                                    sort_keys=True, default=str).encode()).hexdigest()
    known = records.get(out.name)
    if known and known.get("key") == key and out.is_file():
        return known["drawn"]
    drawn = plot(*data, out, title)
    records[out.name] = {"key": key, "drawn": drawn}
    write_json(records_path, records)
    return drawn


def plot_curves(history: list[dict], out: Path, title: str) -> Series:
    """One PNG, a panel per logged quantity (train and eval lines together); the series drawn, by logged key."""
    panels = curve_keys(history)
    if not panels:
        return {}
    plt, fig, axes = _figure(len(panels))
    drawn: Series = {}
    for ax, (base, keys) in zip(axes, panels.items()):
        for key in keys:
            points = [(row["step"], row[key]) for row in history if key in row and "step" in row]
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                              label="eval" if key.startswith("eval_") else "train")
            drawn[key] = [tuple(map(float, xy)) for xy in line.get_xydata()]
        if len(keys) > 1:
            ax.legend(fontsize="small")
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _save(plt, fig, out, title)
    return drawn


def plot_health(history: list[dict], findings: list[Finding], out: Path, title: str) -> Series:
    """A panel per finding about a logged curve: the curve, and a line at the step the finding was made; the
    series drawn, by finding. Findings on end-of-stage metrics only have no curve: none drawn, {} returned."""
    curves = [(f, [(row["step"], row[f["metric"]]) for row in history if f["metric"] in row and "step" in row])
              for f in findings]
    curves = [(f, points) for f, points in curves if len(points) > 1]
    if not curves:
        return {}
    plt, fig, axes = _figure(len(curves))
    drawn: Series = {}
    for ax, (found, points) in zip(axes, curves):
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        if found.get("step") is not None:
            ax.axvline(found["step"], linestyle="--", color="tab:red")
        ax.set_title(f"{found['finding']}: {found['metric']}", fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn[found["finding"]] = [tuple(map(float, xy)) for xy in line.get_xydata()]
    _save(plt, fig, out, title)
    return drawn


def eval_table(metrics: dict[str, float], models: list[str]) -> dict[str, dict[str, float]]:
    """{family: {model or model@bonN or model@passK: value}} from an eval stage's `family/model[@...]` metrics."""
    table: dict[str, dict[str, float]] = {}
    # `family/model[@bonN|@passK]`; a family (reward_<r>/ of an extra reward model named by Hub id) and a model
    # (a Hub id) may each hold a `/`, so the model is matched as a known name at the end
    ends = re.compile(rf"(.+)/((?:{'|'.join(re.escape(m) for m in sorted(models, key=len, reverse=True))})(?:@\w+)?)")
    for key, value in metrics.items():
        found = ends.fullmatch(key) if models else None
        if found is None:
            continue
        family, label = found.groups()
        # reward_<r>/, win_rate_<r>/: by an eval's extra reward models
        if family in EVAL_FAMILIES or family.startswith(("reward_", "win_rate_")):
            table.setdefault(family, {})[label] = value
    return table


def plot_eval(table: dict[str, dict[str, float]], out: Path, title: str) -> dict[str, dict[str, float]]:
    """Bar chart, a panel per metric family and a bar per model; the bar heights drawn, by family and label."""
    plt, fig, axes = _figure(len(table))
    drawn: dict[str, dict[str, float]] = {}
    for ax, (family, values) in zip(axes, table.items()):
        bars = ax.bar(range(len(values)), list(values.values()), color=[
            "tab:orange" if "@" in label else "tab:blue" for label in values])  # sampled: best-of-N, pass@k
        ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize="small")
        ax.bar_label(bars, fmt="%.3g", fontsize="small")
        ax.set_title(family)
        ax.grid(alpha=0.3, axis="y")
        drawn[family] = {label: float(bar.get_height()) for label, bar in zip(values, bars)}
    _save(plt, fig, out, title)
    return drawn


def plot_accuracy(accuracy: dict[str, float], out: Path, title: str) -> dict[str, dict[str, float]]:
    """The RLHF story in one chart: a bar per model of held-out greedy accuracy, in the eval stage's order, each
    labelled with its value and gain over the first model; best-of-N and pass@k as markers over the bars, and
    the first model's pass@k as a dashed line (what sampling can reach, so what RL can collect).

    `accuracy` is `eval_table(...)["accuracy"]` ({model or model@variant: value}); returns what was drawn,
    {"greedy" or variant: {model: value}}, plus {"reach": {variant: value}} for the dashed line.
    """
    greedy = {label: value for label, value in accuracy.items() if "@" not in label}
    sampled: dict[str, dict[str, float]] = {}
    for label, value in accuracy.items():
        model, _, variant = label.partition("@")
        if variant and model in greedy:
            sampled.setdefault(variant, {})[model] = value
    plt, fig, (ax,) = _figure(1)
    fig.set_size_inches(max(PANEL_INCHES[0], 1.6 * len(greedy) + 2), PANEL_INCHES[1] + 1)
    position = {model: i for i, model in enumerate(greedy)}
    bars = ax.bar(range(len(greedy)), list(greedy.values()), color="tab:blue", label="greedy")
    first = next(iter(greedy.values()))
    ax.bar_label(bars, fontsize="small", labels=[f"{v:.2f}" + (f" ({v - first:+.2f})" if i else "")
                                                 for i, v in enumerate(greedy.values())])
    drawn = {"greedy": {model: float(bar.get_height()) for model, bar in zip(greedy, bars)}}
    for variant, values in sampled.items():
        pass_at_k = variant.startswith("pass")
        dots = ax.scatter([position[m] for m in values], list(values.values()), zorder=3, label=sampled_name(variant),
                          marker="^" if pass_at_k else "D", color="tab:green" if pass_at_k else "tab:orange")
        drawn[variant] = {model: float(y) for model, (_, y) in zip(values, dots.get_offsets())}
    first_model = next(iter(greedy))
    for variant in (v for v in sampled if v.startswith("pass") and first_model in sampled[v]):
        line = ax.axhline(sampled[variant][first_model], linestyle="--", color="tab:green",
                          label=f"{first_model} {sampled_name(variant)}: what sampling can reach")
        drawn.setdefault("reach", {})[variant] = float(line.get_ydata()[0])
    ax.set_xticks(range(len(greedy)), list(greedy))
    ax.set_ylim(0, 1.15)  # accuracies are 0..1; room above for the bar labels
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)  # below: clear of the bars
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, out, title)
    return drawn


def headline(stage_type: str, metrics: dict[str, float]) -> str:
    """A stage's key metrics (its spec's `headline`), or "" for a type this installation does not know."""
    known = STAGE_TYPES.get(stage_type)
    return known.spec.headline(metrics) if known else ""


def scores_models(stage_type: str) -> bool:
    known = STAGE_TYPES.get(stage_type)
    return bool(known and known.spec.scores_models)


def cell(value: Any) -> str:
    """A value made safe for a one-line markdown table cell."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # newlines, escapes: shown, not acted on
    return text.replace("|", "\\|") or " "


def samples_table(samples: dict[str, Any]) -> list[str]:
    """Prompts and each model's greedy response; the answer column and ✓/✗ marks only where rows have answers."""
    models = samples["models"]
    answers = any(row.get("answer") for row in samples["rows"])
    lines = ["| prompt | " + ("answer | " if answers else "") + " | ".join(cell(m) for m in models) + " |",
             "|---|" + ("---|" if answers else "") + "---|" * len(models)]
    for row in samples["rows"]:
        shown = []
        for model in models:
            response = row["responses"][model]
            mark = {True: "✓ ", False: "✗ "}.get(response["correct"], "")
            reward = f" ({response['reward']:.2f})" if response.get("reward") is not None else ""
            shown.append(f"{mark}`{cell(response['response'])}`{reward}")
        answer = f" {cell(row['answer'] or '')} |" if answers else ""
        lines.append(f"| {cell(row['prompt'])} |{answer} " + " | ".join(shown) + " |")
    return lines


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_report(run_dir: Path) -> Path:
    """Rebuild `report.md` (and `plots/`) from what the run directory holds."""

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = _read(run_dir / "manifest.json") or {}
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    stages = summary["stages"]
    timings = manifest.get("stage_seconds") or {}
    # A pending stage's result.json, if any, is from an earlier run: its time is not this run's.
    seconds = {name: timings.get(name) or ((_read(run_dir / name / "result.json") or {}).get("seconds")
                                           if stage["status"] in ("completed", "skipped") else None)
               for name, stage in stages.items()}
    commit = (manifest.get("git") or {}).get("commit")
    dirty = " with uncommitted changes" if (manifest.get("git") or {}).get("dirty") else ""
    lines = [f"# Run report: {summary['recipe']}", "",
             f"Recipe `{summary.get('recipe_path')}`, seed {manifest.get('seed')}"
             + (f", git commit `{commit[:12]}`{dirty}" if commit else "") + ".", "",
             "## Headline", "", "| stage | type | status | seconds | key metrics (before -> after) | health |",
             "|---|---|---|---|---|---|"]
    health = {name: recorded_health(run_dir, name, stage, manifest) for name, stage in stages.items()}
    for name, stage in stages.items():
        status = stage["status"]
        if status == "failed" and (run_dir / name / "error.txt").is_file():
            status += f" (see {name}/error.txt)"
        shown = headline(stage["type"], stage["metrics"])
        judged = verdict(health[name]) if health[name] is not None else ""
        lines.append(f"| {name} | {stage['type']} | {cell(status)} | {cell(seconds[name] or '')} | {cell(shown)} "
                     f"| {cell(judged)} |")
    lines += _accuracy_chart(run_dir, stages, plots)
    lines += time_and_disk_section(run_dir, stages, seconds)
    lines += launch_section(stages, manifest)

    for name, stage in stages.items():
        lines += ["", f"## {name} ({stage['type']})", ""]
        if scores_models(stage["type"]):
            lines += _eval_section(run_dir, name, stage, plots)
        elif stage["metrics"]:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {cell(v)} |" for k, v in stage["metrics"].items()]
        history = _read(run_dir / name / "log_history.json")
        if history and drawn_once(plot_curves, plots / f"{name}.png", f"{name} ({stage['type']})", history):
            lines += ["", f"![{name} curves](plots/{name}.png)"]
        if health[name]:
            lines += ["", "Health findings (`pipeline health` prints them with what to try):", ""]
            lines += [f"- {f['finding']}: " + ", ".join(f"{k} {cell(v)}" for k, v in f.items() if k != "finding")
                      for f in health[name]]
            if history and drawn_once(plot_health, plots / f"{name}_health.png", f"{name}: health", history, health[name]):
                lines += ["", f"![{name} health](plots/{name}_health.png)"]

    if manifest.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(manifest["recipe"], sort_keys=False).rstrip(), "```"]
    if manifest.get("packages"):
        lines += ["", "## Environment", "", "| package | version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in manifest["packages"].items()]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def time_and_disk_section(run_dir: Path, stages: dict[str, Any], seconds: dict[str, Any]) -> list[str]:
    """Each stage's time, the part of it its own held-out evaluations took, and the disk its folder uses (a file
    it shares with an earlier stage, hard-linked, counted there: `pipeline.runtime.disk`)."""
    use = disk_use(run_dir, list(stages))
    lines = ["", "## Time and disk", "", "| stage | seconds | of which held-out evaluation | disk | shared with earlier "
             "stages |", "|---|---|---|---|---|"]
    for name in stages:
        # as `seconds`: a result.json of a stage this run did not complete or skip is an earlier run's
        evaluating = ((_read(run_dir / name / "result.json") or {}).get("eval_seconds")
                      if stages[name]["status"] in ("completed", "skipped") else None)
        own, shared = use[name]
        lines.append(f"| {name} | {cell(seconds[name] or '')} | {cell(evaluating if evaluating else '')} | "
                     f"{megabytes(own)} | {megabytes(shared) if shared else ''} |")
    return lines + ["", f"Disk in all: {megabytes(sum(own for own, _ in use.values()))}."]


def recorded_health(run_dir: Path, name: str, stage: dict[str, Any], manifest: dict[str, Any]) -> list[Finding] | None:
    """A finished training stage's findings: as summary.json records them, or (a run from before run health) read
    from its logs; None for other stages and unfinished ones."""
    if stage["status"] not in ("completed", "skipped", "failed"):
        return None
    if "health" in stage:
        return stage["health"]
    if stage["status"] == "failed":
        return None
    return stage_findings(run_dir, name, stage, recipe_settings(manifest.get("recipe") or {}, name))


def launch_section(stages: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """How each stage was trained (process count, distributed type, ZeRO stage), and every launch into the run."""

    lines = ["", "## Launches", "", "| stage | status | launched as |", "|---|---|---|"]
    lines += [f"| {name} | {stage['status']} | {cell(launch_label(stage.get('launch')))} |"
              for name, stage in stages.items() if stage["status"] in ("completed", "skipped", "failed")]
    history = manifest.get("launches") or []
    if history:
        lines += ["", "| launch started | launched as | stages run (seconds) |", "|---|---|---|"]
        for entry in history:
            ran = ", ".join(f"{k} ({v:.0f})" for k, v in (entry.get("stage_seconds") or {}).items()) or "none"
            lines.append(f"| {cell(entry.get('started', '?'))} | {cell(launch_label(entry))} | {cell(ran)} |")
    return lines


def eval_models(run_dir: Path, name: str, metrics: dict[str, float]) -> list[str]:
    """The models an eval stage scored, in its `models` order: from samples.json, else as its metrics list them."""
    samples = _read(run_dir / name / "output" / "samples.json")
    return samples["models"] if samples else list(dict.fromkeys(k.partition("/")[2].split("@")[0] for k in metrics))


def _accuracy_chart(run_dir: Path, stages: dict[str, Any], plots: Path) -> list[str]:
    """`plots/accuracy.png` of the last eval stage that measured held-out accuracy, embedded; none without one."""
    for name, stage in reversed(stages.items()):
        if not scores_models(stage["type"]):
            continue
        accuracy = eval_table(stage["metrics"], eval_models(run_dir, name, stage["metrics"])).get("accuracy")
        if accuracy and any("@" not in label for label in accuracy):
            drawn_once(plot_accuracy, plots / "accuracy.png", f"{name}: held-out accuracy across stages", accuracy)
            return ["", "![held-out accuracy across stages](plots/accuracy.png)"]
    return []


def _eval_section(run_dir: Path, name: str, stage: dict[str, Any], plots: Path) -> list[str]:
    """Metric table (model x metric), bar chart and sample responses of one eval stage."""
    samples = _read(run_dir / name / "output" / "samples.json")
    table = eval_table(stage["metrics"], eval_models(run_dir, name, stage["metrics"]))
    if not table:
        return ["No eval metrics yet."]
    labels = list(dict.fromkeys(label for values in table.values() for label in values))
    lines = ["| model | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    lines += [f"| {cell(label)} | " + " | ".join(cell(table[f].get(label, "")) for f in table) + " |" for label in labels]
    drawn_once(plot_eval, plots / f"{name}.png", f"{name}: held-out evaluation", table)
    lines += ["", f"![{name} results](plots/{name}.png)"]
    if samples and samples["rows"]:
        marks = "✓ correct; " if any(row.get("answer") for row in samples["rows"]) else ""
        lines += ["", f"Sample greedy responses ({marks}reward-model score in brackets):", ""] + samples_table(samples)
    return lines
