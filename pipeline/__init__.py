import logging

# bitsandbytes' CPU backend warns on import, so on every run, that it could not fetch an optional faster
# 4-bit kernel from the Hub; its own fallback is correct, and the pipeline runs offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
