"""`pipeline bench`: one tiny SFT measurement end to end (both paths, fresh processes); shape, not speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import REPO


def test_bench_json_for_sft():
    done = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--json", "--stages", "sft", "--steps", "2",
                           "--repeats", "1", "--model-size", "tiny"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)  # stdout is exactly one JSON object
    assert list(results) == ["sft"]
    sft = results["sft"]
    for key in ("tokens_per_s", "samples_per_s", "peak_mem_mb", "mfu", "overhead_ratio", "stage_time_ratio"):
        assert isinstance(sft[key], float) and math.isfinite(sft[key]) and sft[key] > 0, (key, sft[key])
    assert sft["mfu"] < 1  # a fraction of the measured matmul peak
    assert sft["attn_implementation"] == "sdpa"
    assert "generation_tokens_per_s" not in sft  # SFT generates nothing


def test_bench_rejects_unknown_stage_type():
    done = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--stages", "sftt"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "sftt" in done.stderr
