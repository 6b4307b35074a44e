#!/bin/bash
# GPU checks: the paths CPU CI cannot reach, each run for real on a tiny model and shown in one table.
#
#   bash bench/gpu_check.sh [WORK_DIR]        (from the repository root, the environment active)
#
#   1. SFT in bf16, with FlashAttention-2 where `flash_attn` is installed (the pipeline turns both on by itself on
#      a GPU; the table says which were on), and a second SFT stage asking for Liger's kernels
#      (`use_liger_kernel: true`, which a recipe must ask for) where `liger_kernel` is installed;
#   2. GRPO with vLLM generating in the training process (`vllm_mode: colocate`) where `vllm` is installed;
#   3. FSDP2 (accelerate_configs/fsdp.yaml): a LoRA SFT stage saved with FULL_STATE_DICT, then its adapter
#      reloaded with peft and checked trained. On 2+ GPUs it runs 2 processes; on one GPU, 1 (said in the table).
#
# Exit status 0 only if every check that ran passed; 1, with the step named, if the script's own helpers fail.
# GPU_CHECK_DRY_RUN=1 walks the script through on CPU (bf16, FlashAttention-2, Liger, vLLM and FSDP then report
# "not on GPU"): a check of the script itself, which the test suite runs (tests/test_bench.py).
set -uo pipefail

WORK=$(realpath -m "${1:-runs/gpu_check}")
RUN="$WORK/run"
mkdir -p "$WORK"
LOG="$WORK/log"
: > "$LOG"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())") || { echo "gpu_check: torch does not import" >&2; exit 1; }
if [[ $GPUS -lt 1 && ${GPU_CHECK_DRY_RUN:-0} != 1 ]]; then
  echo "gpu_check: no GPU visible (torch.cuda.device_count() == 0); GPU_CHECK_DRY_RUN=1 checks the script on CPU" >&2
  exit 2
fi
DRY=$(( ${GPU_CHECK_DRY_RUN:-0} == 1 ))  # a dry run checks the script, not the hardware: a few steps each
installed() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

cat > "$WORK/recipe.yaml" <<EOF
name: gpu_check
seed: 0
output_dir: $RUN
defaults: {logging_steps: 5, save_steps: 1000}
stages:
  - {name: tok, type: tokenizer, dataset: data/quickstart/pretrain.jsonl, vocab_size: 512}
  - name: base
    type: pretrain
    tokenizer: tok
    model: {architecture: llama, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 4,
            num_attention_heads: 4, num_key_value_heads: 2}
    dataset: {path: data/quickstart/pretrain.jsonl, test_size: 0.05}
    args: {max_steps: $((DRY ? 2 : 30)), learning_rate: 3.0e-3, per_device_train_batch_size: 16}
  - name: sft
    type: sft
    model: base
    dataset: {path: data/quickstart/sft.jsonl, max_samples: 2000, test_size: 0.05}
    args: {max_steps: $((DRY ? 2 : 30)), learning_rate: 1.0e-3, per_device_train_batch_size: 32, max_length: 64}
  - name: grpo
    type: grpo
    model: sft
    dataset: {path: data/quickstart/prompts.jsonl, max_samples: 256, eval: {path: data/quickstart/eval.jsonl, max_samples: 64}}
    rewards: [{function: exact_match}]
    peft: {r: 8, lora_alpha: 16}
    args: {max_steps: $((DRY ? 1 : 5)), num_generations: 4, per_device_train_batch_size: 8, max_completion_length: 8}
  - name: liger
    type: sft
    model: base
    dataset: {path: data/quickstart/sft.jsonl, max_samples: 512}
    args: {max_steps: $((DRY ? 2 : 10)), learning_rate: 1.0e-3, per_device_train_batch_size: 16, max_length: 64,
           use_liger_kernel: true}
  - name: lora
    type: sft
    model: sft
    dataset: {path: data/quickstart/sft.jsonl, max_samples: 512}
    peft: {r: 8, lora_alpha: 16}
    args: {max_steps: $((DRY ? 2 : 10)), learning_rate: 1.0e-3, per_device_train_batch_size: 16, max_length: 64}
EOF

ROWS=()
FAILED=0
row() { ROWS+=("$1|$2|$3|$4"); [[ $2 == failed ]] && FAILED=1; }  # check, status, seconds, note

# Runs `pipeline run` (or the given launcher) for some stages; output to the log. Returns its exit status.
stages() {
  local started=$SECONDS
  "$@" >> "$LOG" 2>&1
  local status=$?
  ELAPSED=$(( SECONDS - started ))
  return $status
}

# A helper that fails is the script's own error, never a check's "not on GPU": stop, and say where.
die() { echo "gpu_check: $1; see $LOG" >&2; exit 1; }

# What the pipeline turns on by itself on this machine (pipeline.models.loading / pipeline.training.trainers).
FLAGS=$(python - 2>> "$LOG" <<'EOF'
from pipeline.models.loading import attn_implementation, use_bf16
from pipeline.training.trainers import gpu_fast_paths
fast = gpu_fast_paths()
print(use_bf16(), attn_implementation() or "sdpa", fast.get("use_vllm", False))
EOF
) || die "reading what the pipeline turns on failed"
read -r BF16 ATTN VLLM <<< "$FLAGS"

if ! python -m pipeline validate "$WORK/recipe.yaml" >> "$LOG" 2>&1; then
  echo "gpu_check: the check recipe does not validate; see $LOG" >&2
  exit 1
fi
stages python -m pipeline run "$WORK/recipe.yaml" --stages tok,base || row "pretrain (setup)" failed $ELAPSED "see $LOG"

# 1. SFT: bf16, FlashAttention-2; then Liger, asked for.
if stages python -m pipeline run "$WORK/recipe.yaml" --stages sft; then
  USED=$(python - "$RUN/sft/output" 2>> "$LOG" <<'EOF'
import sys
from pipeline.models.loading import load_causal_lm
model = load_causal_lm(sys.argv[1])  # the loader the stage trained with
print(model.config._attn_implementation, str(next(model.parameters()).dtype).removeprefix("torch."))
EOF
) || die "loading the SFT output failed"
  read -r USED_ATTN USED_DTYPE <<< "$USED"
  row "SFT in bf16" "$([[ $BF16 == True && $USED_DTYPE == bfloat16 ]] && echo passed || echo 'not on GPU')" \
      $ELAPSED "weights $USED_DTYPE"
  if installed flash_attn; then
    row "SFT + FlashAttention-2" "$([[ $USED_ATTN == flash_attention_2 ]] && echo passed || echo failed)" \
        $ELAPSED "attention: $USED_ATTN"
  else
    row "SFT + FlashAttention-2" skipped - "flash_attn not installed (attention: $USED_ATTN)"
  fi
else
  row "SFT in bf16" failed $ELAPSED "see $LOG"
fi
if ! installed liger_kernel; then
  row "SFT + Liger kernels" skipped - "liger_kernel not installed"
elif (( GPUS < 1 )); then
  row "SFT + Liger kernels" "not on GPU" - "Liger's kernels are Triton kernels: GPU only"
elif stages python -m pipeline run "$WORK/recipe.yaml" --stages liger; then
  row "SFT + Liger kernels" passed $ELAPSED "use_liger_kernel: true"
else
  row "SFT + Liger kernels" failed $ELAPSED "$(grep -m1 "stage 'liger' failed" "$LOG" | cut -c1-200)"
fi

# 2. GRPO with vLLM colocated in the training process.
if installed vllm; then
  if stages python -m pipeline run "$WORK/recipe.yaml" --stages grpo; then
    note=$(python -c "import json; m = json.load(open('$RUN/summary.json'))['stages']['grpo']['metrics']; \
print(f\"held-out accuracy {m['initial_eval_accuracy']:.3f} -> {m['eval_accuracy']:.3f}\")" 2>> "$LOG") \
      || die "reading the GRPO metrics failed"
    row "GRPO + vLLM colocate" "$([[ $VLLM == True ]] && echo passed || echo 'not on GPU')" $ELAPSED "$note"
  else
    row "GRPO + vLLM colocate" failed $ELAPSED "see $LOG"
  fi
else
  row "GRPO + vLLM colocate" skipped - "vllm not installed"
fi

# 3. FSDP2: LoRA SFT saved with FULL_STATE_DICT, adapter reloaded and checked trained.
PROCS=$(( GPUS >= 2 ? 2 : 1 ))
if stages accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes $PROCS \
     -m pipeline run "$WORK/recipe.yaml" --stages lora; then
  if note=$(python - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
run = Path(sys.argv[1])
launch = json.loads((run / "lora" / "result.json").read_text())["launch"]
adapter = load_file(str(run / "lora" / "output" / "adapter_model.safetensors"))
trained = any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
AutoPeftModelForCausalLM.from_pretrained(run / "lora" / "output")
print(f"{launch['distributed_type']} on {launch['num_processes']} process(es), adapter reloaded, "
      f"lora_B {'trained' if trained else 'still zero'}")
sys.exit(0 if trained else 1)
EOF
  ); then
    status=passed
    # accelerate runs an FSDP config with one process as a plain process: on one GPU that is "not sharded"
    [[ $note == FSDP* ]] || status=$( (( GPUS >= 1 )) && echo "not sharded" || echo "not on GPU")
    (( GPUS < 2 )) && note="$note; fewer than 2 GPUs, so not sharded across processes"
    row "FSDP2 LoRA save + reload" "$status" $ELAPSED "$note"
  else
    row "FSDP2 LoRA save + reload" failed $ELAPSED "${note:-see $LOG}"
  fi
else
  row "FSDP2 LoRA save + reload" failed $ELAPSED "see $LOG"
fi

echo
echo "GPU checks on $(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (dry run)')") x $GPUS"
echo "| check | status | seconds | note |"
echo "|---|---|---|---|"
for entry in "${ROWS[@]}"; do
  IFS='|' read -r check status seconds note <<< "$entry"
  echo "| $check | $status | $seconds | $note |"
done
echo "(log: $LOG)"
exit $FAILED
