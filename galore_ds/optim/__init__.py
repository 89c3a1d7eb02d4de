"""The GaLore optimizers, one per file, and the parameter-group builder."""
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import GaLoreAdamW8bit
from galore_ds.optim.base import GaLoreOptimizer
from galore_ds.optim.groups import param_groups

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "GaLoreOptimizer", "param_groups"]
