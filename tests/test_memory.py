"""Host memory of CPU training: a GGUF model loaded without a second copy of its weights, TRL's fused loss in
small tiles on CPU, freed tensors handed back to the OS, huge pages for large tensors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer import utils as trl_utils

from pipeline.runtime import memory
from pipeline.training import trainers as training
from pipeline.cli import main
from pipeline.models.loading import load_causal_lm
from tests.conftest import REPO, summary, tiny_stages, write_recipe


def write_tiny_llama_gguf(path: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                          ffn: int = 128, vocab: int = 96) -> Path:
    """A llama GGUF file of random fp32 weights (the LM head tied to the embeddings, as in SmolLM2)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 2)])
    writer.add_token_types([1] * vocab)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    kv = hidden // heads * kv_heads
    writer.add_tensor("token_embd.weight", (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32))
    for i in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", (rng.standard_normal(shape) * 0.05).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_model_takes_over_the_loaded_weights(tmp_path, monkeypatch):
    """The ordinary model made from a GGUF-loaded one holds that model's tensors, not a copy of them."""
    pytest.importorskip("gguf")


    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    loaded, original = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = load_causal_lm(str(gguf_file))
    monkeypatch.undo()
    assert len(loaded) == 1 and getattr(model, "hf_quantizer", None) is None
    storage = {t.data_ptr() for t in loaded[0].state_dict().values()}
    assert all(p.data_ptr() in storage for p in model.parameters())  # no second copy
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one parameter, trained as one
    ids = torch.tensor([[0, 5, 9, 20, 1]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded[0](ids).logits)
    model.save_pretrained(tmp_path / "saved")  # an ordinary model: transformers refuses to save a GGUF-loaded one
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").lm_head.weight, model.lm_head.weight)


def test_cpu_loss_tiles_and_unmapped_activations_follow_the_stage(tmp_path, monkeypatch):
    """On CPU, TRL's fused loss works in tiles of CPU_LOSS_TILE_COLUMNS vocabulary columns while a stage trains,
    and a stage with activation checkpointing unmaps freed activations where huge pages are off."""

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    seen = []

    @contextlib.contextmanager
    def spy(enabled):
        seen.append((enabled, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE))
        yield enabled

    monkeypatch.setattr(training, "freed_memory_returned", spy)
    monkeypatch.setattr(training, "huge_pages_on", lambda: False)
    stages = tiny_stages(pretrain_steps=2, sft_steps=2)
    stages[2].update(peft={"r": 4, "lora_alpha": 8})
    stages.append(dict(stages[2], name="sft_ckpt", args={**stages[2]["args"], "activation_checkpointing": True}))

    assert main(["run", str(write_recipe(tmp_path, stages))]) == 0
    assert {s["status"] for s in summary(tmp_path / "run")["stages"].values()} == {"completed"}
    columns = min(default, training.CPU_LOSS_TILE_COLUMNS)
    assert seen == [(False, columns), (False, columns), (True, columns)]  # pretrain, sft, sft_ckpt
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default  # restored after each stage

    with training.loss_tiles_for(torch.device("cuda")):  # Triton folds the tiles in place: TRL's own size
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default


FREED_MEMORY_CHECK = """
import ctypes, os, torch
from pipeline.runtime import memory

libc = memory.glibc()
if libc is None or not hasattr(libc, "mallinfo2"):
    raise SystemExit(77)  # glibc 2.33 or later only

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2
size = 3 << 19  # 1.5 MiB: above the threshold inside, below the 2 MB of PyTorch's huge-page allocations

def mapped_for_a_tensor():
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(size, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del tensor
    return grown

with memory.freed_memory_returned() as active:
    assert active and mapped_for_a_tensor() >= size
assert mapped_for_a_tensor() == 0  # afterwards glibc's 32 MiB ceiling: the heap again
with memory.freed_memory_returned(enabled=False) as active:
    assert not active and mapped_for_a_tensor() == 0
os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 20)  # the user's own setting is left alone
with memory.freed_memory_returned() as active:
    assert not active
"""


def test_freed_memory_returned_maps_large_tensors_of_their_own():
    """In a fresh process: a long-lived one may serve the tensor from a chunk freed earlier on its heap,
    whatever the mmap threshold, so what is measured would depend on the tests before."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", FREED_MEMORY_CHECK], env=env, capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode == 77:
        pytest.skip("glibc 2.33 or later only")
    assert done.returncode == 0, done.stderr[-2000:]


def test_huge_pages_asked_for_where_the_kernel_offers_them(tmp_path, monkeypatch):
    switch = tmp_path / "enabled"
    monkeypatch.setattr(memory, "THP_SWITCH", str(switch))
    for offered, expected in (("always [madvise] never", "1"), ("[always] madvise never", "1"),
                              ("always madvise [never]", None)):
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
        switch.write_text(offered + "\n")
        memory.use_huge_pages()
        assert os.environ.get("THP_MEM_ALLOC_ENABLE") == expected
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stands
    switch.write_text("always [madvise] never\n")
    memory.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0" and not memory.huge_pages_on()
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    monkeypatch.setattr(memory, "THP_SWITCH", str(tmp_path / "missing"))  # not Linux
    memory.use_huge_pages()
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ


@pytest.mark.skipif(not Path(memory.THP_SWITCH).is_file() or "[never]" in Path(memory.THP_SWITCH).read_text(),
                    reason="a kernel that offers transparent huge pages")
def test_huge_pages_on_only_where_pytorch_took_the_switch():
    """PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation: a command's set-up run first, large tensors are on
    huge pages; a tensor made before, and they are not, whatever the environment says."""
    probe = ("from pipeline.runtime.process import prepare_process; prepare_process(); "
             "import pipeline.runtime.memory as m, os; print(os.environ['THP_MEM_ALLOC_ENABLE'], m.huge_pages_on())")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for before, expected in (("", "1 True"), ("import torch; torch.zeros(1); ", "1 False")):
        done = subprocess.run([sys.executable, "-c", before + probe], capture_output=True, text=True, cwd=REPO, env=env)
        assert done.stdout.split() == expected.split(), done.stderr[-2000:]
