"""What the memory benchmarks share: the paper's LLaMA shapes and Linux's peak-RSS counters."""
from __future__ import annotations

#: the paper's LLaMA shapes (vocab 32000) and GaLore ranks
PAPER_MODELS = {
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, rank=128),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, rank=256),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16, rank=256),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32, rank=1024),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, rank=1024),
}


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS: resident now, VmHWM: peak since reset)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start a new VmHWM window (clear_refs 5 sets the peak to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
