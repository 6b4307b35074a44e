import logging
import warnings

# bitsandbytes' CPU backend warns on import, so on every run, that it could not fetch an optional faster
# 4-bit kernel from the Hub; its own fallback is correct, and the pipeline runs offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# TRL 1.16's generation helpers (trl/models/utils.py) read transformers 5's deprecated
# `model.is_gradient_checkpointing`: a warning about a library's call that users cannot act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
