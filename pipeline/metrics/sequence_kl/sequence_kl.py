"""Monte-Carlo estimate of KL(policy || reference) from responses sampled from the policy.

For responses y ~ policy, KL = E[log p_policy(y) - log p_ref(y)], and log p(y) is the sum of the log-probs of
the response tokens. Each row gives those per-token log-probs under both models; the estimate is the mean
over rows of the summed difference (nats per sequence).
"""

import datasets
import evaluate


class SequenceKL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean over sampled sequences of sum_t (log p_policy(y_t) - log p_ref(y_t)).",
            citation="",
            inputs_description="predictions: per-token log-probs under the policy; "
                               "references: per-token log-probs of the same tokens under the reference",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions: list[list[float]], references: list[list[float]]) -> dict[str, float]:
        for policy, reference in zip(predictions, references):
            if len(policy) != len(reference):
                raise ValueError(f"a sequence has {len(policy)} policy but {len(reference)} reference log-probs")
        sums = [sum(policy) - sum(reference) for policy, reference in zip(predictions, references)]
        return {"kl": sum(sums) / len(sums) if sums else 0.0}
