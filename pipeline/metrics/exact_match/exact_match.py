"""Exact match of the answer a response states (read as `pipeline.data.answers` says) against a reference answer."""

import datasets
import evaluate

from pipeline.data.answers import answer_check


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of responses whose answer equals the reference answer exactly. The answer is read "
                        "by `answer_extractor` (an AnswerExtractorSpec: a regex or a function); by default it is the "
                        "first word of the first line, punctuation and a leading 'A:' stripped.",
            citation="",
            inputs_description="predictions: model responses (str); references: answers (str); "
                               "answer_extractor: optional pipeline.config.specs.AnswerExtractorSpec",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str], answer_extractor=None) -> dict[str, float]:
        is_correct = answer_check(answer_extractor)
        hits = [is_correct(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
