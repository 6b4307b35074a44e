"""What this machine's CPU offers, read without importing torch (validation's cached verdicts key on it)."""

from __future__ import annotations


def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX's bf16 tiles (Intel Sapphire Rapids and later), from /proc/cpuinfo's flags; None
    where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return None
    return "amx_bf16" in flags.split()
