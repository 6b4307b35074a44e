"""Publish a stage's output to the Hugging Face Hub with a model card (`push_to_hub:` and `pipeline push`).

The upload is one `HfApi.upload_folder` commit: the output folder's weights (or LoRA adapter, or that adapter
merged into its base) and tokenizer, plus a README.md model card with the recipe excerpt, lineage, metrics and
package versions. (With `hf_xet` installed, upload_folder splits a folder into several commits only past ~250
files or 100 MB of small non-LFS files; a model folder has a dozen files, its weights in LFS/Xet.)
The token is never touched here: `huggingface_hub` reads it from HF_TOKEN or the user's saved login, and
HF_ENDPOINT picks the server, so no token reaches a file, a log or the card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData

from pipeline.config.paths import HUB_ID, resolve_local
from pipeline.config.specs import PushSpec, TrainStageSpec
from pipeline.models.loading import base_model_path, is_adapter, save_merged
from pipeline.runtime.environment import package_versions
from pipeline.stages import STAGE_TYPES

# Never uploaded: training_args.bin is a pickle (loading it runs code; the card carries the recipe instead).
# A README.md the trainer wrote is replaced by the card.
IGNORED_FILES = ["training_args.bin"]
PUSH_RECORD = "pushed.json"


def upstream(recipe: dict[str, Any], name: str, keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The recipe entries of `name` and every stage it draws on, in recipe order: through any value naming a
    stage (models, data, reward models, judges), or with `keys` only through those top-level keys."""
    by_name = {s["name"]: s for s in recipe["stages"]}

    def named(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value] if value in by_name else []
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return [n for item in items for n in named(item)]

    found, pending = set(), [name]
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            stage = by_name[current]
            pending += named([v for k, v in stage.items() if k != "name" and (keys is None or k in keys)])
    return [s for s in recipe["stages"] if s["name"] in found]


def base_model(chain: list[dict[str, Any]], recipe_path: Path | None) -> str | None:
    """The Hub id the chain starts from, or None for a model trained from scratch or a local folder."""
    names = {s["name"] for s in chain}
    for stage in chain:
        ref = stage.get("model")
        if isinstance(ref, str) and ref not in names and not resolve_local(ref, recipe_path) and HUB_ID.match(ref):
            return ref
    return None


def run_relative(run_dir: Path, path: str) -> str:
    """A path inside the run as `<stage>/...` (a card and its config must not carry this machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return Path(path).name


def describe(stage: dict[str, Any], names: set[str]) -> str:
    ref = stage.get("model") or stage.get("load")  # a `tokenizer` stage names what it loads in `load`
    if isinstance(ref, dict):
        source = f"a fresh `{ref.get('architecture')}` model"
    elif ref in names:
        source = f"stage `{ref}`"
    elif ref:
        source = f"`{ref}`"
    else:
        source = "scratch"
    return f"`{stage['name']}` ({stage['type']}) from {source}"


def model_card(run_dir: Path, name: str, repo_id: str, folder: Path) -> str:
    """README.md for the Hub: metadata header, lineage, metrics (the stage's own and any eval of it), recipe excerpt."""

    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recipe = manifest["recipe"]
    recipe_path = Path(manifest["recipe_path"]) if manifest.get("recipe_path") else None
    chain = upstream(recipe, name, keys=("model", "tokenizer", "load"))  # where the weights and tokenizer come from
    stage_type = summary["stages"][name]["type"]
    model_task = STAGE_TYPES[stage_type].spec.model_task
    adapter = is_adapter(folder)
    base = base_model(chain, recipe_path)
    adapter_base = base_model_path(folder) if adapter else None
    if adapter and adapter_base != base:  # an adapter on a stage's own weights does not load on the Hub model
        base = None
    data = ModelCardData(
        base_model=base, library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification" if model_task == "seq-cls" else "text-generation",
        tags=["pipeline", stage_type] + (["lora"] if adapter else []))

    names = {s["name"] for s in chain}
    lines = [f"# {repo_id}", "",
             f"Stage `{name}` ({stage_type}) of the recipe `{recipe['name']}`, trained with `pipeline` "
             f"(seed {manifest.get('seed')}).", "", "## Lineage", ""]
    lines += [f"{i}. {describe(stage, names)}" for i, stage in enumerate(chain, 1)]
    if adapter:
        local = resolve_local(adapter_base, recipe_path)
        lines += ["", f"This is a LoRA adapter on `{run_relative(run_dir, adapter_base) if local else adapter_base}`."]
        if local:
            lines.append("That base is a folder of the run, not on the Hub: push that stage too, or push with "
                         "`merge_adapter: true`.")

    metrics = summary["stages"][name]["metrics"]
    evals = {f"{stage} / {key}": value for stage, record in summary["stages"].items() if STAGE_TYPES[record["type"]].spec.scores_models
             for key, value in record["metrics"].items() if key.partition("/")[2].split("@")[0] == name}
    for title, values in (("Metrics", metrics), ("Evaluation", evals)):
        if values:
            lines += ["", f"## {title}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in values.items()]

    excerpt = {"seed": recipe.get("seed"), **({"defaults": recipe["defaults"]} if recipe.get("defaults") else {}),
               "stages": upstream(recipe, name)}
    lines += ["", "## Recipe excerpt", "", "```yaml", yaml.safe_dump(excerpt, sort_keys=False).rstrip(), "```"]
    loader = ("peft import AutoPeftModelForCausalLM as Model" if adapter
              else "transformers import AutoModelForSequenceClassification as Model" if model_task == "seq-cls"
              else "transformers import AutoModelForCausalLM as Model")
    lines += ["", "## Use", "", "```python", f"from {loader}", "from transformers import AutoTokenizer", "",
              f'model = Model.from_pretrained("{repo_id}")', f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
              "```"]
    versions = manifest.get("packages") or package_versions()
    lines += ["", "## Framework versions", ""] + [f"- {k}: {v}" for k, v in versions.items() if v != "not installed"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def push_stage(run_dir: Path, name: str, push: PushSpec, log: Callable[[str], None] = print) -> str:
    """Upload stage `name`'s output and model card to `push.repo_id` in one commit; return the commit URL."""

    if push.check():
        raise ValueError(f"push_to_hub: {'; '.join(push.check())}")
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    record = summary["stages"].get(name)
    output = run_dir / name / "output"
    if record is None or record["status"] not in ("completed", "skipped") or not output.is_dir():
        raise ValueError(f"stage '{name}' has no finished output in {run_dir} to push")
    with tempfile.TemporaryDirectory() as tmp:
        # upload_folder commits one folder as it is: the card must be a file in it, and the stage's output stays
        # as the stage wrote it. So the folder is the merged model, or links to the output's files (not copies:
        # weights may be gigabytes), plus the card.
        folder = Path(tmp) / "upload"
        if push.merge_adapter and is_adapter(output):
            save_merged(output, folder, task=STAGE_TYPES[record["type"]].spec.model_task)
        else:
            shutil.copytree(output.resolve(), folder, copy_function=os.symlink)
        if not any(folder.rglob("*.safetensors")):
            raise ValueError(f"stage '{name}' ({record['type']}) wrote no model weights to push")
        config = folder / "adapter_config.json"
        if config.is_file() and resolve_local(base_model_path(folder), None):  # a local base: name it run-relative
            values = json.loads(config.read_text())
            values["base_model_name_or_path"] = run_relative(run_dir, values["base_model_name_or_path"])
            config.unlink()  # a link to the stage's own file: never write through it
            config.write_text(json.dumps(values, indent=2))
        card = model_card(run_dir, name, push.repo_id, folder)
        (folder / "README.md").unlink(missing_ok=True)  # a link to the trainer's README: never write through it
        (folder / "README.md").write_text(card)
        api = HfApi()
        api.create_repo(push.repo_id, private=push.private, exist_ok=True)
        if push.revision:
            api.create_branch(push.repo_id, branch=push.revision, exist_ok=True)
        message = f"Upload stage '{name}' ({record['type']}) of recipe '{summary['recipe']}'"
        commit = api.upload_folder(repo_id=push.repo_id, folder_path=folder, revision=push.revision,
                                   ignore_patterns=IGNORED_FILES, commit_message=message)
    (run_dir / name / PUSH_RECORD).write_text(json.dumps(
        {"fingerprint": record.get("fingerprint"), "push": vars(push), "commit_url": commit.commit_url}, indent=1))
    log(f"[{name}] pushed to {push.repo_id}: {commit.commit_url}")
    return commit.commit_url


def push_if_configured(run_dir: Path, stage: TrainStageSpec, status: str, log: Callable[[str], None] = print) -> None:
    """Runner hook after each stage: push a finished stage that asks for it, unless this exact output and
    these settings were pushed already (so rerunning a finished recipe does not upload again)."""
    push = stage.push_to_hub
    if push is None or status not in ("completed", "skipped"):
        return
    try:
        done = json.loads((run_dir / stage.name / PUSH_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        done = None
    fingerprint = json.loads((run_dir / "summary.json").read_text())["stages"][stage.name].get("fingerprint")
    if done and done["fingerprint"] == fingerprint and done["push"] == vars(push):
        return
    push_stage(run_dir, stage.name, push, log)
