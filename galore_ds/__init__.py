"""galore_ds: GaLore (gradient low-rank projection) for LLaMA pre-training, from one 24 GB
GPU to DeepSpeed ZeRO 0-3 and FSDP2 clusters."""
from galore_ds.optim import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreOptimizer,
    param_groups,
)

__version__ = "0.1.0"
__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "GaLoreOptimizer", "param_groups"]
