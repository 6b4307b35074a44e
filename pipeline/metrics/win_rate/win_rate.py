"""Win rate of a model against a baseline on the same prompts, judged by per-response scores (ties count half)."""

import datasets
import evaluate


class WinRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="(wins + ties / 2) / n, where a win is a prediction scored above its reference.",
            citation="",
            inputs_description="predictions: the model's scores; references: the baseline's scores on the same prompts",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        points = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(predictions, references)]
        return {"win_rate": sum(points) / len(points) if points else 0.0}
