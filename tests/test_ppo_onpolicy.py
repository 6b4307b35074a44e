"""PPO is on-policy by construction, on three tokenizer families.

- quickstart: the project's own byte-level BPE (no BOS added, pad distinct from EOS);
- llama: a tokenizer whose post-processor adds BOS to plain text, with no pad token (load_tokenizer pads with EOS);
- chatml: pad == EOS (SmolLM2, Qwen), chat-message prompts whose system and user turns end in that token.

For each: the rollout's prompt ids are the ones TRL's trainers train on, the log-probs recomputed for the
update equal the ones generation sampled from, and PPO's ratio is exactly 1 before any update, with
dropout in the model and in LoRA.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.algorithms.ppo_trainer.config import PPOConfig
from pipeline.algorithms.ppo_trainer.maths import policy_loss
from pipeline.algorithms.ppo_trainer.trainer import PPOTrainer, Rollout
from pipeline.config.specs import PeftSpec
from pipeline.data.prompts import record_prompt_format
from pipeline.models.loading import load_tokenizer, recipe_precision
from pipeline.stages.ppo import PPOSpec, build_models
from pipeline.models.chat_templates import CHATML_TEMPLATE
from pipeline.stages.tokenizer import BOS, EOS, PAD, train_bpe
from tests.conftest import DATA

FAMILIES = ("quickstart", "llama", "chatml")
QUESTIONS = ["What is 3 + 4?", "What letter comes after c?", "Which is larger, 12 or 7?", "What is 9 - 2?"] * 4


def make_tokenizer(family: str, directory) -> None:
    import json

    texts = [json.loads(line)["text"] for line in (DATA / "pretrain.jsonl").read_text().splitlines()[:2000]]
    backend = train_bpe(texts, vocab_size=300, min_frequency=2)
    if family == "llama":
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                               special_tokens=[(BOS, backend.token_to_id(BOS))])
    pad = {"quickstart": PAD, "llama": None, "chatml": EOS}[family]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=pad)
    tokenizer.chat_template = CHATML_TEMPLATE
    if family != "chatml":  # its "Q: ... A:" prompts are plain text, as an SFT on plain text records it
        record_prompt_format(tokenizer, chat=False)
    tokenizer.save_pretrained(directory)


def prompts_for(family: str) -> list:
    if family == "chatml":  # <|im_end|> (== pad) closes the system and user turns inside every prompt
        return [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}] for q in QUESTIONS]
    return [f"Q: {q}\nA:" for q in QUESTIONS]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tokenizer(request.param, directory)
    tokenizer = load_tokenizer(str(directory))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         attention_dropout=0.2,  # dropout in the model itself: PPO must switch it off
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    return request.param, directory


def length_reward(prompts, completions, **_):
    return [float(len(c if isinstance(c, str) else c[0]["content"])) / 10 for c in completions]


def trainer_for(model_dir, peft: bool, **args) -> PPOTrainer:
    family, directory = model_dir
    # lora_dropout 0.3: a LoRA dropout PPO must switch off too
    spec = PPOSpec(name="ppo", type="ppo", model=str(directory), dataset=None,
                   peft=PeftSpec(lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.3}) if peft else None)
    config = PPOConfig(output_dir=str(directory / "ppo"), rollout_batch_size=8, mini_batch_size=4, max_new_tokens=6,
                       **args)
    model, reference = build_models(spec, str(directory), init_std=0.0, critic=config.uses_critic)
    if peft:  # LoRA B starts at 0 (policy == reference); move it so the adapters take part in every forward
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
    dataset = Dataset.from_dict({"prompt": prompts_for(family)})
    return PPOTrainer(config, model, load_tokenizer(str(directory)), dataset, [length_reward], [1.0], ["length"],
                      ref_model=reference)


def experience(trainer: PPOTrainer) -> Rollout:
    """A rollout, scored and with advantages: what `PPOTrainer.update` trains on (the first half of `step`)."""
    rollout, _ = trainer.rollout()
    trainer.score(rollout)
    trainer.advantages(rollout)
    return rollout


def test_rollout_prompts_are_tokenized_as_trl_trains_on_them(model_dir):
    from trl.data_utils import _tokenize  # what SFTTrainer/DPOTrainer/GRPOTrainer feed the model for a prompt

    family, _ = model_dir
    trainer = trainer_for(model_dir, peft=False)
    rollout, _ = trainer.rollout()
    tokenizer = trainer.tokenizer
    for prompt, ids, mask in zip(rollout.prompts, rollout.query, rollout.query_mask):
        expected = (_tokenize(tokenizer, prompt, add_generation_prompt=True) if isinstance(prompt, list)
                    else _tokenize(tokenizer, prompt))["input_ids"]
        assert ids[mask.bool()].tolist() == list(expected)
    first = rollout.query[rollout.query_mask.bool()][0].item()
    assert (first == tokenizer.bos_token_id) == (family == "llama")
    if family == "chatml":  # every in-prompt <|im_end|> is pad-valued yet attended
        attended = rollout.query[rollout.query_mask.bool()]
        assert (attended == tokenizer.pad_token_id).sum() == 2 * len(rollout.prompts)


def test_rollouts_sample_the_policy_and_end_at_its_stop_ids(model_dir):
    """A Hub model's shipped decoding defaults (generation_config.json) do not shape rollouts, which would make
    every update off-policy; a response ends at any end-of-sequence id the model lists (pipeline.models.sampling)."""
    trainer = trainer_for(model_dir, peft=True)
    rollout, _ = trainer.rollout()
    greedy = trainer.generate_responses(rollout.prompts, rollout.rows, do_sample=False)
    shipped = trainer.unwrapped.policy.get_base_model().generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size, shipped.min_new_tokens = 5.0, 1, 6
    again = trainer.generate_responses(rollout.prompts, rollout.rows, do_sample=False)
    assert torch.equal(again.response, greedy.response) and torch.equal(again.mask, greedy.mask)

    written = greedy.response[greedy.mask.bool()].tolist()
    other = max((t for t in set(written) if t != trainer.tokenizer.eos_token_id), key=written.count)
    shipped.eos_token_id = [trainer.tokenizer.eos_token_id, other]
    stopped = trainer.generate_responses(rollout.prompts, rollout.rows, do_sample=False)
    for row in range(len(greedy.response)):
        before = greedy.response[row][greedy.mask[row].bool()].tolist()
        end = before.index(other) + 1 if other in before else len(before)
        assert stopped.response[row][stopped.mask[row].bool()].tolist() == before[:end]
        assert bool(stopped.ended[row]) == (other in before or bool(greedy.ended[row]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_update_logprobs_equal_rollout_logprobs(model_dir, peft, precision):
    """The update's forward pass (the prepared model, as `update` calls it) reproduces the rollout's log-probs and
    values exactly, and both match the logits `generate` decoded the rollout with."""
    with recipe_precision(precision):
        trainer = trainer_for(model_dir, peft)
        rollout = experience(trainer)
        trainer.model.eval()
        with torch.no_grad():
            logprobs, values, _ = trainer.policy_outputs(trainer.model, rollout, torch.arange(8))
        mask = rollout.mask.bool()
        assert torch.equal(logprobs[mask], rollout.logprobs[mask])
        assert torch.equal(values * rollout.mask, rollout.values)

        # the last-position logits of every forward pass over all rows inside the trainer's generation: the last
        # `width` of them are the ones each response token was decoded from (before: the prompts' prefill)
        decoded, rows = [], len(rollout.prompts)
        language_model = trainer.unwrapped.policy
        language_model = language_model.get_base_model() if peft else language_model
        hook = language_model.register_forward_hook(
            lambda module, args, out: decoded.append(out.logits[:, -1].float()) if len(out.logits) == rows else None)
        greedy = trainer.generate_responses(rollout.prompts, rollout.rows, do_sample=False)
        hook.remove()
        with torch.no_grad():
            recomputed, _, _ = trainer.policy_outputs(trainer.unwrapped, greedy, temperature=1.0)
    width = greedy.response.shape[1]
    generated = torch.stack(decoded[-width:], 1).log_softmax(-1).gather(-1, greedy.response[..., None])[..., 0]
    mask = greedy.mask.bool()
    # bf16: within its rounding (the prefill reads prompts in other shapes than the scoring pass: 2e-3 measured)
    assert torch.allclose(recomputed[mask], generated[mask], atol=1e-4 if precision == "fp32" else 1e-2)


def test_bf16_rollouts_compute_lora_in_bf16_as_the_update_does(model_dir):
    """Under bf16 autocast the update computes the fp32 adapters in bf16; the rollout does too (without autocast
    it computed them in fp32: another rounding, and SmolLM2's LoRA rollouts 1.16-1.47x slower)."""
    with recipe_precision("bf16"):
        trainer = trainer_for(model_dir, peft=True)
        lora_a = next(m for n, m in trainer.unwrapped.named_modules() if n.endswith("lora_A.policy"))
        assert lora_a.weight.dtype == torch.float32
        seen = []
        hook = lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        trainer.rollout()
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_ratio_is_one_before_the_first_update(model_dir, peft):
    """With a vanishing learning rate every minibatch is a first one: approximate KL 0, nothing clipped."""
    trainer = trainer_for(model_dir, peft, learning_rate=1e-30, ppo_epochs=2)
    rollout = experience(trainer)
    stats = trainer.update(rollout)
    assert stats["approx_kl"] < 1e-12 and stats["clip_fraction"] == 0.0
    # and the same check computed directly on one minibatch
    trainer.model.eval()
    idx = torch.arange(4)
    with torch.no_grad():
        logprobs, _, _ = trainer.policy_outputs(trainer.model, rollout, idx)
    _, clip_fraction, approx_kl = policy_loss(logprobs, rollout.logprobs[idx], rollout.advantages[idx],
                                              rollout.mask[idx], 0.2)
    assert float(approx_kl) == 0.0 and float(clip_fraction) == 0.0


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_ratio_is_one_before_the_first_update_in_bf16(model_dir, peft):
    """`precision: bf16`: the models load in bf16 and PPO computes under bf16 autocast, rollout and update alike, so
    the update still starts exactly on-policy."""
    with recipe_precision("bf16"):
        trainer = trainer_for(model_dir, peft, learning_rate=1e-30, ppo_epochs=2)
        assert torch.bfloat16 in {p.dtype for p in trainer.model.parameters()}
        assert trainer.accelerator.mixed_precision == "bf16"
        rollout = experience(trainer)
        stats = trainer.update(rollout)
    assert stats["approx_kl"] < 1e-12 and stats["clip_fraction"] == 0.0


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_every_parameter_with_a_gradient_is_trained_and_cleared(model_dir, peft):
    """Policy and critic (with LoRA: both adapters, though peft freezes the one added last) are in the optimizer:
    each update changes them, and no gradient is left to pile up into the next update's clipping norm."""
    trainer = trainer_for(model_dir, peft, learning_rate=1e-2, ppo_epochs=1)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rollout = experience(trainer)
    trainer.update(rollout)
    named = dict(trainer.model.named_parameters())
    assert any(".value." in n for n in before) == peft  # the critic's adapter is trainable
    for name, param in named.items():
        if param.requires_grad:
            assert id(param) in optimized, name
            assert param.grad is None or not param.grad.any(), name
            assert not torch.equal(param, before[name]), f"{name} did not train"


def test_nan_loss_is_a_one_line_training_error(model_dir, monkeypatch):
    from pipeline.training.trainers import TrainingDiverged

    trainer = trainer_for(model_dir, peft=True)
    rollout = experience(trainer)
    rollout.advantages = rollout.advantages * float("nan")
    with pytest.raises(TrainingDiverged, match="PPO loss became nan at step 1"):
        trainer.update(rollout)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_critic_starts_from_the_reward_model(model_dir, peft, tmp_path):
    """`value_model`: the critic is the reward model's trunk and score head, so before any update V(s_t), the value
    of the state before response token t, is the reward model's score of the prompt and the response before t."""
    from transformers import LlamaForSequenceClassification

    family, directory = model_dir
    config = LlamaForCausalLM.from_pretrained(directory).config
    config.num_labels = 1
    torch.manual_seed(1)
    reward_model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        reward_model.score.weight.normal_(std=1.0)
    reward_model.save_pretrained(tmp_path)
    load_tokenizer(str(directory)).save_pretrained(tmp_path)

    spec = PPOSpec(name="ppo", type="ppo", model=str(directory), dataset=None, value_model=str(tmp_path),
                   peft=PeftSpec(lora={"r": 4, "lora_alpha": 8}) if peft else None)
    model, reference = build_models(spec, str(directory), 0.0, value_model_path=str(tmp_path))
    assert model.critic_trunk is not None and (reference is None) == peft
    trainer = PPOTrainer(PPOConfig(output_dir=str(tmp_path / "ppo"), rollout_batch_size=8, mini_batch_size=4,
                                   max_new_tokens=6), model, load_tokenizer(str(directory)),
                         Dataset.from_dict({"prompt": prompts_for(family)}), [length_reward], [1.0], ["length"],
                         ref_model=reference)
    rollout = experience(trainer)
    last = rollout.mask.sum(1).long() - 1
    values_before_last = rollout.values[torch.arange(8), last]
    # the reward model's score head on its own trunk's last hidden state, for the same ids one row at a time
    # (its pooled logit would skip a final EOS where pad == EOS)
    with torch.no_grad():
        expected = [float(reward_model.score(reward_model.model(torch.cat([q[m.bool()], r[:n]])[None])
                                             .last_hidden_state)[0, -1, 0])
                    for q, m, r, n in zip(rollout.query, rollout.query_mask, rollout.response, last)]
    assert torch.allclose(values_before_last, torch.tensor(expected), atol=1e-4)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_activation_checkpointing_recomputes_layers_and_changes_no_number(model_dir, peft):
    """`activation_checkpointing`: the update recomputes every decoder layer in its backward pass (each runs once
    more per minibatch: policy, and critic where it has one) even though PPO keeps the model in eval mode, while
    the rollout and the trained weights are exactly those of a run without it."""
    if model_dir[0] != "quickstart":
        pytest.skip("one tokenizer family is enough: checkpointing does not touch tokenization")
    trained, calls = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        trainer = trainer_for(model_dir, peft, learning_rate=1e-2, ppo_epochs=1, activation_checkpointing=on)
        rollout = experience(trainer)
        layers = [m for m in trainer.unwrapped.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        counted = []
        # a recomputed layer runs its `forward` again, whose submodules' hooks fire
        hooks = [layer.mlp.register_forward_pre_hook(lambda *_: counted.append(1)) for layer in layers]
        trainer.update(rollout)
        for hook in hooks:
            hook.remove()
        calls[on] = len(counted)
        trained[on] = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
        if on:
            assert all(layer.training for layer in layers) and not trainer.unwrapped.policy.training
    minibatches = 8 // 4
    assert calls[True] == 2 * calls[False] and calls[False] == minibatches * (
        2 * 2 if trainer.unwrapped.has_critic else 2)  # 2 layers; policy and critic passes
    assert trained[True].keys() == trained[False].keys()
    for name in trained[False]:
        assert torch.equal(trained[True][name], trained[False][name]), name
