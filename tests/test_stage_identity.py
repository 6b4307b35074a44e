"""A skip cannot be stale: a stage reruns when the code it runs, a library version or a hardware choice changes."""

from __future__ import annotations

import hashlib
import shutil

import pytest

import pipeline.run.stage_identity as identity
from pipeline.cli import main
from tests.conftest import DATA, REPO, summary, write_recipe


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the package's sources, read by `code_digest` instead of the real ones."""
    root = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(identity, "PACKAGE_ROOT", root)
    identity.code_digest.cache_clear()
    yield root
    identity.code_digest.cache_clear()


def test_the_real_package_is_read():
    """Not through the copy: the digest of a stage module covers that module and what it imports (when this
    module moved into pipeline/run/, it read no file at all, and every digest was that of nothing)."""
    identity.code_digest.cache_clear()
    assert identity.module_file("pipeline.stages.ppo") == REPO / "pipeline" / "stages" / "ppo.py"
    assert identity.module_file("pipeline.algorithms.ppo_trainer.trainer").is_file()
    assert identity.code_digest("pipeline.stages.ppo") != hashlib.sha256(b"").hexdigest()
    assert identity.code_digest("pipeline.stages.ppo") != identity.code_digest("pipeline.stages.tokenizer")


def test_code_digest_follows_the_modules_a_stage_imports(package_copy):
    before = identity.code_digest("pipeline.stages.ppo")
    (package_copy / "outputs" / "report.py").write_text((package_copy / "outputs" / "report.py").read_text() + "\n# not run by ppo\n")
    identity.code_digest.cache_clear()
    assert identity.code_digest("pipeline.stages.ppo") == before
    (package_copy / "algorithms" / "ppo_trainer" / "maths.py").write_text(
        (package_copy / "algorithms" / "ppo_trainer" / "maths.py").read_text() + "\n# the maths changed\n")
    identity.code_digest.cache_clear()
    assert identity.code_digest("pipeline.stages.ppo") != before  # reached through stages/ppo.py -> trainer.py
    assert identity.code_digest("pipeline.stages.tokenizer") == identity.code_digest("pipeline.stages.tokenizer")


def test_a_stage_reruns_when_its_code_or_a_library_changes(tmp_path, package_copy, monkeypatch):
    recipe = write_recipe(tmp_path, [{"name": "tok", "type": "tokenizer", "vocab_size": 300,
                                      "dataset": {"path": str(DATA / "pretrain.jsonl"), "max_samples": 200}}])
    run_dir = tmp_path / "run"

    def status() -> str:
        assert main(["run", str(recipe)]) == 0
        return summary(run_dir)["stages"]["tok"]["status"]

    assert status() == "completed"
    assert status() == "skipped"
    (package_copy / "stages" / "tokenizer.py").write_text(
        (package_copy / "stages" / "tokenizer.py").read_text() + "\n# edited\n")
    identity.code_digest.cache_clear()
    assert status() == "completed"
    assert status() == "skipped"
    versions = identity.library_versions()
    monkeypatch.setattr(identity, "library_versions", lambda: {**versions, "tokenizers": "0.0.1"})
    assert status() == "completed"
    monkeypatch.setattr(identity, "resolved_hardware", lambda: {"bf16": True})
    assert status() == "completed"


def test_a_stage_reruns_when_its_user_code_changes(tmp_path, monkeypatch):
    """A reward function, answer extractor, tool or environment named `module:function` is part of the stage's
    inputs: editing its file changes the fingerprint (a skip would keep results of the old function)."""
    from pipeline.validation.recipe_checks import load_recipe

    monkeypatch.chdir(tmp_path)  # where `pipeline run` finds a recipe's own modules
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    (tmp_path / "unrelated.py").write_text("X = 1\n")
    recipe_path = write_recipe(tmp_path, [{"name": "grpo", "type": "grpo", "model": "some/model",
                                           "dataset": str(DATA / "prompts.jsonl"),
                                           "rewards": [{"function": "my_rewards:short"}]}])

    def fingerprint() -> str:
        recipe = load_recipe(recipe_path)
        return identity.fingerprint(recipe, recipe.stage("grpo"), {})

    before = fingerprint()
    (tmp_path / "unrelated.py").write_text("X = 2\n")
    assert fingerprint() == before
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [0.0 for _ in completions]\n")
    assert fingerprint() != before
