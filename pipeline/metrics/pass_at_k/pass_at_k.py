"""pass@k: the chance that at least one of k responses to a prompt is correct, estimated from n >= k samples.

The unbiased estimator of Chen et al. 2021 (Evaluating Large Language Models Trained on Code): with c of the
n samples correct, pass@k = 1 - C(n - c, k) / C(n, k) per prompt, averaged over prompts. Drawing exactly k
samples and checking any-correct is the n = k case; more samples lower the variance.
"""

from math import comb

import datasets
import evaluate


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): one minus the chance that k of the n samples, drawn without replacement, miss."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)  # exact integers: comb(n - c, k) is 0 when fewer than k miss


class PassAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean over prompts of 1 - C(n - c, k) / C(n, k): the unbiased pass@k estimate from n samples "
                        "per prompt, c of them correct.",
            citation="Chen et al. 2021, Evaluating Large Language Models Trained on Code, arXiv:2107.03374",
            inputs_description="predictions: correct samples per prompt (c); references: samples per prompt (n); "
                               "k: the number of attempts",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int], k: int = 1) -> dict[str, float]:
        values = [pass_at_k(n, c, k) for c, n in zip(predictions, references)]
        return {"pass_at_k": sum(values) / len(values) if values else 0.0}
