"""Loading and saving models and tokenizers: precision, LoRA, k-bit quantisation, adapters.

A stage's output folder holds either full weights or a LoRA adapter (plus the tokenizer);
`load_causal_lm` takes either, so every later stage can start from any earlier one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import PartialState
from peft import AutoPeftModelForSequenceClassification, PeftModel
from peft.helpers import disable_input_dtype_casting
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from pipeline.config.specs import QuantizationSpec



# The recipe's `precision` (`pipeline.config.recipe`), set by the runner around a run and by validation around the
# configs it builds.
_RECIPE_PRECISION: ContextVar[str] = ContextVar("precision", default="auto")


@contextmanager
def recipe_precision(value: str) -> Iterator[None]:
    """Compute in the precision the recipe's `precision` says while the block runs."""
    token = _RECIPE_PRECISION.set(value)
    try:
        yield
    finally:
        _RECIPE_PRECISION.reset(token)


def use_bf16() -> bool:
    """Whether models load and compute in bf16: the recipe's `precision`, and for `auto` the hardware's: bf16 where
    a GPU supports it, fp32 on CPU (without AMX, a CPU's bf16 matmul is ~200x slower than its fp32)."""
    precision = _RECIPE_PRECISION.get()
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def process_defaults() -> dict[str, Any]:
    """`use_cpu` and `ddp_backend` for TrainingArguments (and the runner's PartialState) on this hardware.

    accelerate sets up data parallelism between CPU processes only when told it is on CPU;
    otherwise each process of a CPU-only `accelerate launch` trains alone as "the main process".
    Under DeepSpeed (DS_ACCELERATOR=cpu) it must not be told that, but needs the gloo backend
    named, or it again counts one process.
    """

    # torch.accelerator (CUDA, XPU, MPS, ...) exists from torch 2.6; the package allows 2.4
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if accelerator:
        return {"use_cpu": False, "ddp_backend": None}
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return {"use_cpu": not deepspeed, "ddp_backend": "gloo" if deepspeed and launched else None}


def attn_implementation() -> str | None:
    """FlashAttention-2 on GPUs computing in bf16 where `flash_attn` is installed; else None (transformers' default,
    SDPA, which on GPUs dispatches to its own flash / memory-efficient kernels)."""

    return ("flash_attention_2" if use_bf16() and torch.cuda.is_available() and importlib.util.find_spec("flash_attn")
            is not None else None)


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if use_bf16() else torch.float32


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_gguf(path: str | Path) -> bool:
    """A GGUF checkpoint (llama.cpp's format): `folder/file.gguf`, a local file or a file in a Hub repo."""
    return str(path).endswith(".gguf")


def stage_base(path: str, stage_dir: Path, *, trust_remote_code: bool = False) -> str:
    """`path` as a folder of plain weights that a training stage can start from and name as its adapters' base.

    An unmerged LoRA adapter is merged into its own base, and a GGUF file dequantized, once, into
    `stage_dir/base` (with the tokenizer); any other path is returned as it is. The stage loads its model
    from there, so an adapter it saves names that folder as `base_model_name_or_path` and plain `peft`
    (`AutoPeftModelForCausalLM.from_pretrained(output)`) loads exactly the model the stage trained. Merging
    the upstream adapter in memory only would leave the new adapter pointing at the raw base, silently
    without the upstream training. The cost is one copy of the weights on disk per such stage.
    """
    if not (is_gguf(path) or is_adapter(path)):
        return path

    base = stage_dir / "base"
    with PartialState().main_process_first():  # the main process writes it; the other ranks then find it
        if not base.is_dir():
            partial = stage_dir / "base.partial"  # renamed once whole, so a killed write is redone
            if is_gguf(path):
                model = load_causal_lm(path, trust_remote_code=trust_remote_code)
                model.save_pretrained(partial, safe_serialization=True)
                load_tokenizer(path, trust_remote_code=trust_remote_code).save_pretrained(partial)
            else:
                save_merged(Path(path), partial, trust_remote_code=trust_remote_code)
            os.replace(partial, base)
    return str(base)


def starting_point(spec, stage_dir: Path, path: str) -> str:
    """Where a training stage's model and tokenizer load from: `stage_base(path)`, except that an upstream
    adapter trained further (`peft: {adapter: continue}`) stays an adapter on its own base."""
    if spec.peft is not None and spec.peft.continues and is_adapter(path):
        return path
    return stage_base(path, stage_dir, trust_remote_code=spec.trust_remote_code)


def load_policy(path: str, spec) -> tuple[Any, Any]:
    """(model, peft_config to hand the trainer) for a training stage starting from `path`.

    By default an upstream LoRA adapter is merged into its base and `peft:` stacks a fresh adapter
    on top. With `peft: {adapter: continue}` the upstream adapter itself is trained further, on its
    own base and with its own LoraConfig: the trainer gets the PeftModel and no new config, and DPO
    and GRPO keep a frozen copy of the adapter (TRL's "ref" adapter) as the reference.
    """
    if spec.peft is not None and spec.peft.continues:
        if not is_adapter(path):
            raise ValueError(f"stage '{spec.name}': peft.adapter: continue needs `model` to be a LoRA adapter "
                             f"(a stage trained with `peft` and no `merge: true`); {path} holds full weights")
        model = load_causal_lm(path, quantization=spec.quantization, trust_remote_code=spec.trust_remote_code,
                               merge_adapter=False)
        return model, None
    model = load_causal_lm(path, quantization=spec.quantization, trust_remote_code=spec.trust_remote_code,
                           revision=spec.revision)
    return model, (spec.peft.lora_config("CAUSAL_LM") if spec.peft is not None else None)


def quantized_compute_dtype(spec: QuantizationSpec) -> torch.dtype:
    """The dtype k-bit layers compute in: the recipe's `compute_dtype`, else the hardware's."""
    return getattr(torch, spec.compute_dtype) if spec.compute_dtype else compute_dtype()


def quantization_config(spec: QuantizationSpec | None):
    """bitsandbytes settings for k-bit loading, or None."""
    if spec is None:
        return None

    dtype = quantized_compute_dtype(spec)
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)


def match_trainable_dtype(model, spec: QuantizationSpec | None) -> None:
    """Give a k-bit model's trainable parameters the compute dtype again, after TRL made them bf16.

    TRL casts every trainable parameter of a quantized model to bf16 (the QLoRA paper's recipe for
    GPUs). With fp32 compute, as on CPU, a plain layer such as a reward model's score head then
    fails ("expected m1 and m2 to have the same dtype"), and bf16 LoRA matmuls are ~200x slower.
    """
    if spec is None or quantized_compute_dtype(spec) == torch.bfloat16:
        return  # not quantized, or TRL's bf16 already is the compute dtype
    dtype = quantized_compute_dtype(spec)
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.to(dtype)


def keep_4bit_layers_differentiable(model):
    """Keep bitsandbytes' 4-bit layers out of their CPU inference layout; returns the model.

    On a CPU with AVX512-BF16, a `Linear4bit` that runs in eval mode repacks its weights, once and for good
    (bitsandbytes 0.50: undone only by saving or moving to a GPU), for a kernel with no backward (`gemv_4bit`).
    Every training step after the first evaluation (the stages' held-out evaluation on start, GRPO's and PPO's
    rollouts) then drops the gradient through every quantized layer, with nothing but a warning from torch:
    LoRA gradients 20-80% off in a 2-layer model (tests/test_stages.py). The plain dequantize-and-matmul
    path stays correct in both modes.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def contiguous_lm_head_input(model):
    """Hand a 16-bit model's LM head contiguous hidden states; returns the model.

    With `logits_to_keep` (generation's prefill, PPO's scoring and updates) the LM head reads a slice of the last
    positions of every row, a strided view that `torch.matmul` does not fold into one matrix product: it runs a
    batched product against the weight broadcast over the rows. On a CPU, in bf16 that materialises the weight once
    per row (SmolLM2, 16 rows: 0.9 GB copied, 1.0 s of a 3 s rollout; in fp32 the BLAS reads it in place, and the
    hook is not set, so fp32 results stay bit for bit what they were).
    """
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dtype in (torch.bfloat16,
                                                                                                  torch.float16):
        head.register_forward_pre_hook(contiguous_first_input)
    return model


def contiguous_first_input(module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def autocast_as_trained(accelerator, model) -> ExitStack:
    """For generation: the autocast a trainer's forward passes run under (bf16 mixed precision; nothing in fp32).

    peft keeps LoRA adapters in fp32 on a bf16 model, and autocast computes them in bf16 while training; a rollout
    outside autocast computed them in fp32: another rounding of the policy than the one trained, and slower where
    prompts are long (SmolLM2, all-linear LoRA, 8 rows of 160 + 32 tokens: 1.16-1.47x in six paired runs; PPO's
    bench shape, 16 rows of ~20 + 16: the same speed; 2026-12-05). peft's cast of each input to its adapter's
    dtype is off inside, as in PPO's update (`PPOTrainer.update` says why).
    """
    stack = ExitStack()
    stack.enter_context(accelerator.autocast())
    stack.enter_context(disable_input_dtype_casting(model, active=accelerator.native_amp))
    return stack


def gguf_location(path: str) -> dict[str, str]:
    """`from_pretrained` arguments for a GGUF file: its folder (or Hub repo) and `gguf_file`."""
    folder, name = os.path.split(path)
    return {"pretrained_model_name_or_path": folder or ".", "gguf_file": name}


# Tokenizers that state no limit report 1e30 (transformers' VERY_LARGE_INTEGER); anything above this is no limit.
NO_LIMIT = 10**9


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """AutoTokenizer with a pad token guaranteed (the EOS token where the tokenizer has no pad).

    From a GGUF file, `model_max_length` (which GGUF does not carry: 1e30) is the model's context length.
    """

    if is_gguf(path):
        where = gguf_location(path)
        tokenizer = AutoTokenizer.from_pretrained(**where, trust_remote_code=trust_remote_code, revision=revision)
        if tokenizer.model_max_length > NO_LIMIT:
            config = AutoConfig.from_pretrained(**where, trust_remote_code=trust_remote_code, revision=revision)
            tokenizer.model_max_length = getattr(config.get_text_config(), "max_position_embeddings", NO_LIMIT)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_model_path(path: str | Path) -> str:
    """The base model an adapter folder was trained on."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_causal_lm(path: str, *, quantization: QuantizationSpec | None = None, trust_remote_code: bool = False,
                   revision: str | None = None, merge_adapter: bool = True):
    """A causal LM from full weights, or from a LoRA adapter folder (merged into its base by default).

    Weights load as safetensors only, so a pickle file in a downloaded repo is never executed.
    """

    kwargs: dict[str, Any] = dict(dtype=compute_dtype(), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation() is not None:
        kwargs["attn_implementation"] = attn_implementation()
    quant = quantization_config(quantization)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if is_gguf(path):
        return contiguous_lm_head_input(load_gguf(path, revision=revision, **kwargs))
    if not is_adapter(path):
        return contiguous_lm_head_input(keep_4bit_layers_differentiable(
            AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)))

    base = contiguous_lm_head_input(keep_4bit_layers_differentiable(
        AutoModelForCausalLM.from_pretrained(base_model_path(path), **kwargs)))
    model = PeftModel.from_pretrained(base, path, is_trainable=not merge_adapter)
    if not merge_adapter:
        return model
    return model.merge_and_unload().requires_grad_(True)  # peft froze the base weights while it held them


def load_gguf(path: str, **kwargs: Any):
    """A causal LM from a GGUF file, dequantized to `dtype` (by the `gguf` package) as an ordinary model.

    transformers marks a GGUF-loaded model as quantized and refuses to save it (5.24); the same weights
    in a model built from its config are an ordinary model that trains, saves and merges adapters like
    any other. That model is built on the meta device and takes over the loaded tensors themselves
    (`assign=True`): one copy of the weights, not two (for SmolLM2-135M in fp32, 0.54 GB less at the peak).
    """

    kwargs.pop("use_safetensors", None)  # the weights are in the .gguf file
    if kwargs.get("quantization_config") is not None:
        raise ValueError(f"{path}: k-bit `quantization` of a GGUF model is done on its dequantized copy; "
                         "start the stage from a stage or folder, not from the .gguf file itself")
    loaded = AutoModelForCausalLM.from_pretrained(**gguf_location(path), **kwargs)
    config = loaded.config
    config.quantization_config = None  # the GgufConfig: left in, saving would record the weights as quantized
    vars(config).pop("quantization_config", None)
    with torch.device("meta"):  # no storage: every tensor comes from `loaded`
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype,
                                                 trust_remote_code=kwargs.get("trust_remote_code", False))
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():  # also those outside the state dict (rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    model.tie_weights()  # `assign` gave tied parameters (embeddings and LM head) one Parameter object each
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: the GGUF file left {', '.join(left[:5])} without weights")
    model.name_or_path = path
    return model


@contextmanager
def held_back_load_report() -> Iterator[None]:
    """Drop transformers' loading-report warning (the "LOAD REPORT ... MISSING" table) while loading."""

    logger = logging.getLogger("transformers.modeling_utils")
    drop = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def save_merged(adapter_dir: Path, out_dir: Path, *, trust_remote_code: bool = False, task: str = "causal-lm") -> None:
    """Merge a saved LoRA adapter into full-precision base weights and save those (with the tokenizer)."""
    if task == "causal-lm":
        model = load_causal_lm(str(adapter_dir), trust_remote_code=trust_remote_code, merge_adapter=True)
    else:
        # The base is a causal LM: its report calls the score head MISSING, and the adapter then loads the trained one
        with held_back_load_report():
            model = AutoPeftModelForSequenceClassification.from_pretrained(
                str(adapter_dir), num_labels=1, dtype=compute_dtype(), trust_remote_code=trust_remote_code)
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(str(adapter_dir)).save_pretrained(out_dir)
