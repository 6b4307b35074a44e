"""`python -m bench`: throughput, peak memory, MFU and the pipeline's overhead over plain TRL, per stage type.

    workloads  what each stage type trains, the models (built from scratch) and the data
    direct     the same training as the minimal TRL script a user would write
    probe      instruments a child process: training-loop time, tokens, generation, peak memory
    child      one measurement in a fresh process (`python -m bench.child`)
    suite      runs the children interleaved and reduces them to the per-stage table / JSON
    scaling    step time against sequence length, batch size and model size; full vs LoRA vs QLoRA memory
    sft_memory peak memory and step time of LoRA SFT of SmolLM2-135M at 2 x 512 tokens (`--sft-memory`)
    rollouts   generated tokens/s of each stage's rollouts, plain `generate` against the stages' (`--rollouts`)
"""

from pipeline.runtime.process import prepare_process

# As the `pipeline` command does before importing the libraries: huge pages asked for, library noise silenced.
prepare_process()
