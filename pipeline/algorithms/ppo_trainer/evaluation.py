"""Held-out evaluation of a `PPOTrainer`'s policy, outside the algorithm: the stage runs it before and after
training."""

from __future__ import annotations

import torch
from datasets import Dataset

from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer
from pipeline.data.answers import AnswerCheck, reference_answer
from pipeline.models.reward_functions import exact_match_reward


@torch.no_grad()
def evaluate(trainer: PPOTrainer, dataset: Dataset, is_correct: AnswerCheck) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean score per reward term, accuracy, and KL to the reference.

    The KL is exact, not sampled: sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)) over the vocabulary at every
    position of the greedy response, averaged over prompts (a sampled log-ratio of a greedy response can be
    negative). Prompts are split between processes and the sums gathered. Accuracy reads answers with
    `is_correct`, when the rows have an `answer` column.
    """
    accuracy = exact_match_reward(is_correct)
    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = dataset.select(range(rank, len(dataset), world))
    names = ["kl"] + [f"reward/{n}" for n in trainer.reward_names]
    answers = "answer" in dataset.column_names  # accuracy over the rows that have one (`reference_answer`)
    sums = torch.zeros(len(names) + 2 * answers, device=accelerator.device)
    batch_size = trainer.config.rollout_batch_size
    for start in range(0, len(shard), batch_size):
        rows = shard.select(range(start, min(start + batch_size, len(shard))))
        columns = {name: list(rows[name]) for name in rows.column_names}
        batch = trainer.generate_responses(columns["prompt"], columns, do_sample=False)
        # the KL between the models' own distributions (temperature 1), not the sampling ones
        logits, _ = trainer.unwrapped(**batch.sequence_inputs())
        log_pi, log_ref = logits[:, :-1].float().log_softmax(-1), trainer.reference_logits(batch).log_softmax(-1)
        kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)
        values = [float((kl * batch.mask).sum())]
        values += [float(v.sum()) for v in trainer.term_scores(batch).values()]
        if answers:
            values.append(sum(accuracy(batch.prompts, trainer.completions(batch), columns["answer"])))
            values.append(sum(bool(reference_answer(a)) for a in columns["answer"]))
        sums += torch.tensor(values, device=sums.device)
    sums = trainer.all_reduce_sum(sums).tolist()
    metrics = {f"eval_{k}": v / len(dataset) for k, v in zip(names, sums)}
    if answers:
        metrics["eval_accuracy"] = sums[-2] / max(sums[-1], 1)
    return metrics
