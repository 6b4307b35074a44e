"""A YAML recipe drives a staged post-training run; `pipeline.cli` is the command, `pipeline.config` the recipe.

Importing the package sets nothing up: each command does, in `pipeline.runtime.process.prepare_process`."""
