"""The public optimizers, one per file, and the per-layer mode that wraps any of them."""
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import GaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"]
