"""Loading and saving models and tokenizers: precision, LoRA, k-bit quantisation, adapters.

A stage's output folder holds either full weights or a LoRA adapter (plus the tokenizer);
`load_causal_lm` takes either, so every later stage can start from any earlier one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.recipe import QuantizationSpec

# Keys a recipe's `peft:` takes beyond peft.LoraConfig's own fields.
PEFT_EXTRA_KEYS = ("merge",)
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def use_bf16() -> bool:
    """bf16 where a GPU supports it; fp32 on CPU, where bf16 matmul is ~200x slower."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if use_bf16() else torch.float32


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_policy(path: str, spec) -> tuple[Any, Any]:
    """(model, peft_config to hand the trainer) for a training stage starting from `path`.

    An upstream LoRA adapter is merged into its base; `peft:` then stacks a fresh adapter on top.
    """
    model = load_causal_lm(path, quantization=spec.quantization, trust_remote_code=spec.trust_remote_code,
                           revision=spec.revision)
    return model, (lora_config(spec.peft, "CAUSAL_LM") if spec.peft is not None else None)


def lora_config(peft: dict[str, Any], task_type: str):
    """A peft.LoraConfig from the recipe's `peft:` mapping, with small-model-friendly defaults."""
    from peft import LoraConfig

    options = {**LORA_DEFAULTS, **{k: v for k, v in peft.items() if k not in PEFT_EXTRA_KEYS}}
    return LoraConfig(task_type=task_type, **options)


def quantization_config(spec: QuantizationSpec | None):
    """bitsandbytes settings for k-bit loading, or None."""
    if spec is None:
        return None
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, spec.compute_dtype) if spec.compute_dtype else compute_dtype()
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """AutoTokenizer with a pad token guaranteed (the EOS token where the tokenizer has no pad)."""
    from transformers import AutoTokenizer

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
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=compute_dtype(), trust_remote_code=trust_remote_code, use_safetensors=True)
    quant = quantization_config(quantization)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model_path(path), **kwargs)
    model = PeftModel.from_pretrained(base, path, is_trainable=not merge_adapter)
    if not merge_adapter:
        return model
    return model.merge_and_unload().requires_grad_(True)  # peft froze the base weights while it held them


def save_merged(adapter_dir: Path, out_dir: Path, *, trust_remote_code: bool = False, task: str = "causal-lm") -> None:
    """Merge a saved LoRA adapter into full-precision base weights and save those (with the tokenizer)."""
    if task == "causal-lm":
        model = load_causal_lm(str(adapter_dir), trust_remote_code=trust_remote_code, merge_adapter=True)
    else:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(
            str(adapter_dir), num_labels=1, dtype=compute_dtype(), trust_remote_code=trust_remote_code).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(str(adapter_dir)).save_pretrained(out_dir)
