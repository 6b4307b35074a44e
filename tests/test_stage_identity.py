"""A skip cannot be stale: a stage reruns when the code it runs, a library version or a hardware choice changes."""

from __future__ import annotations

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
