"""Metric modules against hand-computed values, best-of-N and pair selection, and the report's plots and tables."""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image

from pipeline.metrics import load_metric
from pipeline.outputs.report import DPI, PANEL_INCHES, eval_table, plot_accuracy, plot_curves, plot_eval, write_report
from pipeline.stages.eval import best_of_n
from pipeline.stages.generate import make_pairs


def test_exact_match_module():
    # "A: 7." -> "7" (echoed prefix and punctuation dropped); "12 is it" -> "12"; "" -> no answer; "b\nc" -> "b".
    result = load_metric("exact_match").compute(predictions=["19", "A: 7.", "12 is it", "", "b\nc", "18"],
                                                references=["19", "7", "12", "0", "b", "19"])
    assert result == {"exact_match": pytest.approx(4 / 6)}


def test_win_rate_module_counts_ties_half():
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    result = load_metric("win_rate").compute(predictions=[3.0, 1.0, 2.0, 5.0], references=[1.0, 1.0, 3.0, 0.0])
    assert result == {"win_rate": 0.625}


def test_sequence_kl_module():
    # Row 1: (-0.1 - 0.2) - (-0.3 - 0.4) = 0.4; row 2: -1.0 - (-0.5) = -0.5; mean -0.05.
    kl = load_metric("sequence_kl")
    result = kl.compute(predictions=[[-0.1, -0.2], [-1.0]], references=[[-0.3, -0.4], [-0.5]])
    assert result["kl"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="1 policy but 2 reference"):
        kl.compute(predictions=[[-0.1]], references=[[-0.1, -0.2]])


def test_perplexity_module():
    # Token probabilities 1/2, 1/4 and 1/2: mean NLL (ln 2 + ln 4 + ln 2) / 3 = (4/3) ln 2 -> 2^(4/3);
    # per row 2^(3/2) and 2, mean of those.
    result = load_metric("perplexity").compute(predictions=[[math.log(0.5), math.log(0.25)], [math.log(0.5)]])
    assert result["perplexity"] == pytest.approx(2 ** (4 / 3))
    assert result["mean_perplexity"] == pytest.approx((2 ** 1.5 + 2) / 2)


def test_pass_at_k_module_is_the_unbiased_estimator():
    from pipeline.metrics.pass_at_k.pass_at_k import pass_at_k

    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6; c=2: 1 - 1/6; k=1 is c/n; n-c < k: every draw holds a hit.
    assert pass_at_k(4, 1, 2) == 0.5 and pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8) and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    result = load_metric("pass_at_k").compute(predictions=[1, 2, 0], references=[4, 4, 4], k=2)
    assert result == {"pass_at_k": pytest.approx((0.5 + 5 / 6 + 0.0) / 3)}
    with pytest.raises(ValueError, match="n=4, c=1, k=5"):
        pass_at_k(4, 1, 5)


def test_unknown_metric_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="exact_match, pass_at_k, perplexity, sequence_kl, win_rate"):
        load_metric("accuracy")


def test_best_of_n_keeps_the_top_scored_candidate_per_prompt():
    picks, best = best_of_n(["a", "b", "c", "d", "e", "f"], [0.1, 0.9, 0.5, 0.2, 0.2, 0.1], n=3)
    assert picks == ["b", "d"] and best == [0.9, 0.2]  # "d" and "e" tie: the first sample wins


def test_make_pairs():
    responses, scores = ["w", "x", "y", "z"], [0.5, 2.0, -1.0, 0.6]
    assert make_pairs(responses, scores, "best_worst", 0.0) == [(1, 2)]
    assert make_pairs(responses, scores, "all", 0.0) == [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)]
    assert make_pairs(responses, scores, "all", 1.5) == [(1, 2), (3, 2)]  # margins 3.0 and 1.6 exceed 1.5; 1.5 does not
    assert make_pairs(["same", "same"], [1.0, 0.0], "best_worst", 0.0) == []  # identical texts are no preference
    assert make_pairs(responses, [1.0] * 4, "best_worst", 0.0) == []


# ---------------------------------------------------------------------------------------------- report
def history(scale: float) -> list[dict]:
    """A log history shaped like TRL's: train rows, eval rows, a final train_* summary row."""
    rows = [{"step": s, "loss": scale / s, "reward": scale * s, "kl": 0.1 * s, "grad_norm": 1.0,
             "rewards/exact_match_reward/mean": 0.5} for s in (1, 2, 3)]
    rows += [{"step": 3, "eval_loss": scale / 4, "eval_accuracy": 0.75}, {"step": 3, "train_loss": scale}]
    return rows


def test_plot_curves_draws_the_logged_values(tmp_path):
    drawn = plot_curves(history(1.0), tmp_path / "a.png", "a")
    assert drawn == {"loss": [(1, 1.0), (2, 0.5), (3, 1 / 3)], "eval_loss": [(3, 0.25)],
                     "reward": [(1, 1.0), (2, 2.0), (3, 3.0)], "kl": [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))],
                     "rewards/exact_match_reward/mean": [(1, 0.5), (2, 0.5), (3, 0.5)], "eval_accuracy": [(3, 0.75)]}
    # 5 panels (loss with eval_loss, reward, kl, rewards/.../mean, accuracy): 4 columns, 2 rows.
    image = Image.open(tmp_path / "a.png")
    assert image.format == "PNG"
    assert image.size == (4 * PANEL_INCHES[0] * DPI, 2 * PANEL_INCHES[1] * DPI)
    assert len(image.convert("L").getcolors()) > 10  # lines and text drawn, not a blank canvas
    plot_curves(history(1.0), tmp_path / "b.png", "a")
    plot_curves(history(2.0), tmp_path / "c.png", "a")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_plot_eval_draws_one_bar_per_model_and_metric(tmp_path):
    metrics = {"accuracy/sft": 0.25, "accuracy/sft@bon4": 0.5, "accuracy/sft@pass8": 0.7, "accuracy/dpo": 0.3,
               "reward/sft": -1.0, "win_rate/dpo": 0.6, "accuracy/other": 1.0}  # `other` was not among the scored models
    table = eval_table(metrics, ["sft", "dpo"])
    assert table == {"accuracy": {"sft": 0.25, "sft@bon4": 0.5, "sft@pass8": 0.7, "dpo": 0.3}, "reward": {"sft": -1.0},
                     "win_rate": {"dpo": 0.6}}
    assert plot_eval(table, tmp_path / "eval.png", "eval") == table
    assert Image.open(tmp_path / "eval.png").size == (3 * PANEL_INCHES[0] * DPI, PANEL_INCHES[1] * DPI)
    # every family an eval writes; an extra reward model named by Hub id keeps its `/` in the family
    more = {"judge/sft": 3.5, "tool_calls/dpo": 1.0, "env_reward/dpo": 0.5, "reward_org/rm-x/sft": 0.2,
            "win_rate_org/rm-x/dpo": 0.7, "accuracy/org/hub-model@bon4": 0.1, "reward_org/rm-x/org/hub-model": 0.3}
    assert eval_table(more, ["sft", "dpo", "org/hub-model"]) == {
        "judge": {"sft": 3.5}, "tool_calls": {"dpo": 1.0}, "env_reward": {"dpo": 0.5},
        "reward_org/rm-x": {"sft": 0.2, "org/hub-model": 0.3}, "win_rate_org/rm-x": {"dpo": 0.7},
        "accuracy": {"org/hub-model@bon4": 0.1}}


def test_write_report_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    for name in ("rm", "grpo", "eval"):
        (run / name / "output").mkdir(parents=True)
    stages = {"rm": {"type": "reward", "status": "completed", "metrics": {"initial_eval_accuracy": 0.52,
                                                                        "eval_accuracy": 0.75}},
              "grpo": {"type": "grpo", "status": "skipped", "metrics": {"eval_accuracy": 0.4}},
              "eval": {"type": "eval", "status": "completed",
                       "metrics": {"accuracy/grpo": 0.4, "reward/grpo": 1.5, "accuracy/grpo@bon4": 0.5}}}
    for stage in stages.values():
        stage["output"] = ""
    (run / "summary.json").write_text(json.dumps({"recipe": "r", "recipe_path": "r.yaml", "stages": stages}))
    (run / "manifest.json").write_text(json.dumps({
        "recipe": {"name": "r", "stages": [{"name": "rm", "type": "reward"}]}, "seed": 3,
        "stage_seconds": {"rm": 12.5}, "packages": {"trl": "1.16.0"}, "git": {"commit": "abcdef1234567890"}}))
    (run / "grpo" / "result.json").write_text(json.dumps({"seconds": 99.0}))  # skipped this time: timing from result
    (run / "rm" / "log_history.json").write_text(json.dumps(
        [{"step": 1, "loss": 0.7, "accuracy": 0.5}, {"step": 2, "loss": 0.6, "accuracy": 0.8}]))
    (run / "grpo" / "log_history.json").write_text(json.dumps(history(1.0)))
    (run / "eval" / "output" / "samples.json").write_text(json.dumps({"models": ["grpo"], "rows": [
        {"prompt": "What is 1 + 2?", "answer": "3",
         "responses": {"grpo": {"response": "3|x\n", "correct": True, "reward": 1.25}}}]}))

    report = write_report(run).read_text()
    assert "seed 3, git commit `abcdef123456`" in report
    assert "| rm | reward | completed | 12.5 | pair accuracy 0.52 -> 0.75 |" in report
    assert "| grpo | grpo | skipped | 99 | exact match 0.4 |" in report
    assert "| eval | eval | completed |   | accuracy grpo 0.4; reward grpo 1.5 |" in report
    assert "| eval_accuracy | 0.75 |" in report
    assert "![rm curves](plots/rm.png)" in report and "![grpo curves](plots/grpo.png)" in report
    assert "| model | accuracy | reward |" in report and "| grpo | 0.4 | 1.5 |" in report and "| grpo@bon4 | 0.5 |" in report
    assert "![eval results](plots/eval.png)" in report
    assert "![held-out accuracy across stages](plots/accuracy.png)" in report  # one model: its bar, no gain
    assert (run / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| What is 1 + 2? | 3 | ✓ `3\\|x\\n` (1.25) |" in report  # pipes escaped, newline shown, not broken
    assert "```yaml\nname: r\nstages:\n- name: rm\n  type: reward\n```" in report
    assert "| trl | 1.16.0 |" in report
    for name in ("rm", "grpo", "eval"):
        assert Image.open(io.BytesIO((run / "plots" / f"{name}.png").read_bytes())).format == "PNG"
    rm_plot = Image.open(run / "plots" / "rm.png")
    assert rm_plot.size == (2 * PANEL_INCHES[0] * DPI, PANEL_INCHES[1] * DPI)  # loss and accuracy panels
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["git"]["dirty"] = True
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "git commit `abcdef123456` with uncommitted changes." in write_report(run).read_text()


ACCURACY = {"sft": 0.45, "sft@bon8": 0.6, "sft@pass8": 0.9, "dpo": 0.5, "grpo": 0.66, "grpo@pass8": 0.93, "ppo": 0.62}


def test_plot_accuracy_draws_greedy_bars_and_sampled_markers(tmp_path):
    drawn = plot_accuracy(ACCURACY, tmp_path / "accuracy.png", "eval")
    assert drawn == {"greedy": {"sft": 0.45, "dpo": 0.5, "grpo": 0.66, "ppo": 0.62}, "bon8": {"sft": 0.6},
                     "pass8": {"sft": 0.9, "grpo": 0.93}, "reach": {"pass8": 0.9}}  # the line: the first model's pass@8
    assert list(drawn["greedy"]) == ["sft", "dpo", "grpo", "ppo"]  # the eval stage's order, not sorted
    assert plot_accuracy({"dpo": 0.5, "dpo@bon4": 0.6}, tmp_path / "b.png", "eval") == {
        "greedy": {"dpo": 0.5}, "bon4": {"dpo": 0.6}}  # no pass@k: no line


def fake_run(run, stages: dict[str, dict]) -> None:
    """A run directory holding only summary.json, as a run that wrote nothing else leaves it."""
    for stage in stages.values():
        stage.setdefault("status", "completed")
        stage["output"] = ""
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"recipe": "r", "stages": stages}))


def test_report_opens_with_the_headline_table_and_accuracy_chart(tmp_path):
    run = tmp_path / "run"
    eval_metrics = {f"accuracy/{label}": value for label, value in ACCURACY.items()} | {"reward/sft": 1.5}
    fake_run(run, {"sft": {"type": "sft", "metrics": {"initial_eval_loss": 8.5, "eval_loss": 0.2}},
                   "grpo": {"type": "grpo", "metrics": {"initial_eval_accuracy": 0.45, "eval_accuracy": 0.66}},
                   "eval": {"type": "eval", "metrics": eval_metrics}})
    report = write_report(run).read_text()
    lines = report.splitlines()
    assert lines[4:7] == ["## Headline", "",
                          "| stage | type | status | seconds | key metrics (before -> after) | health |"]
    assert lines[8:11] == ["| sft | sft | completed |   | held-out loss 8.5 -> 0.2 | healthy |",
                           "| grpo | grpo | completed |   | exact match 0.45 -> 0.66 | healthy |",
                           "| eval | eval | completed |   | accuracy sft 0.45, dpo 0.5, grpo 0.66, ppo 0.62; "
                           "pass@8 sft 0.9, grpo 0.93; reward sft 1.5 |   |"]
    assert lines[12] == "![held-out accuracy across stages](plots/accuracy.png)"  # under the table, before the rest
    assert report.count("plots/accuracy.png") == 1
    chart = Image.open(run / "plots" / "accuracy.png")
    assert chart.format == "PNG" and len(chart.convert("L").getcolors(4096)) > 10
    assert "| sft@pass8 | 0.9 |" in report and "| grpo@pass8 | 0.93 |" in report  # in the eval stage's table too


def test_report_without_an_eval_stage_has_no_accuracy_chart(tmp_path):
    run = tmp_path / "run"
    fake_run(run, {"sft": {"type": "sft", "metrics": {"initial_eval_loss": 8.5, "eval_loss": 0.2}},
                   "eval": {"type": "eval", "status": "pending", "metrics": {}}})
    report = write_report(run).read_text()
    assert "## Headline" in report and "| sft | sft | completed |   | held-out loss 8.5 -> 0.2 | healthy |" in report
    assert "| eval | eval | pending |   |   |   |" in report
    assert "accuracy.png" not in report and not (run / "plots" / "accuracy.png").exists()


def test_headline_is_each_stage_types_key_metric_before_and_after():
    from pipeline.outputs.report import headline

    assert headline("sft", {"train_loss": 3.0, "initial_eval_loss": 8.55, "eval_loss": 0.18}) == "held-out loss 8.55 -> 0.18"
    # DPO's step-0 pair accuracy is 0 by construction (policy = reference: every pair a tie), so no "before"
    assert headline("dpo", {"eval_loss": 0.6, "initial_eval_rewards/accuracies": 0.0, "eval_rewards/accuracies": 0.63,
                            "initial_eval_rewards/margins": 0.0, "eval_rewards/margins": 0.041}) == (
        "pair accuracy 0.63, reward margin 0 -> 0.041")
    ppo = {"initial_eval_accuracy": 0.641, "eval_accuracy": 0.655, "initial_eval_reward/rm": 3.063,
           "eval_reward/rm": 3.101, "initial_eval_kl": 0.0, "eval_kl": 0.044, "policy_loss": 0.1}
    assert headline("ppo", ppo) == "exact match 0.641 -> 0.655, reward rm 3.06 -> 3.1, KL 0.044"
    assert headline("grpo", {"train_reward_first": 0.53, "train_reward_last": 0.61}) == "train reward 0.53 -> 0.61"
    assert headline("reward", {}) == ""  # failed or pending: nothing measured
