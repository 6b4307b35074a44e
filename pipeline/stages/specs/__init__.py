"""Each stage type's recipe keys (its spec) and registration; see `pipeline.stages`."""
