"""Exact match of the answer a response states (see `pipeline.tasks.extract_answer`) against a reference answer."""

import datasets
import evaluate

from pipeline.tasks import exact_match


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of responses whose first word (punctuation and a leading 'A:' stripped) equals "
                        "the reference answer exactly.",
            citation="",
            inputs_description="predictions: model responses (str); references: answers (str)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = [exact_match(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
