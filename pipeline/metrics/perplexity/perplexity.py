"""Perplexity of reference completions from their per-token log-probs under a model.

Unlike the Hub's `perplexity` module this one does not load a model: the caller scores the tokens (with the
prompt as context) and passes their log-probs. `perplexity` is token-weighted, exp(-sum of log-probs / tokens),
over all rows; `mean_perplexity` is the mean of the per-row perplexities.
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp of the mean negative log-likelihood per token of reference completions.",
            citation="",
            inputs_description="predictions: per-token log-probs (natural log) of each reference completion",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions: list[list[float]]) -> dict[str, float]:
        rows = [row for row in predictions if row]
        if not rows:
            raise ValueError("no tokens to score")
        tokens = sum(len(row) for row in rows)
        return {"perplexity": math.exp(-sum(sum(row) for row in rows) / tokens),
                "mean_perplexity": sum(math.exp(-sum(row) / len(row)) for row in rows) / len(rows)}
