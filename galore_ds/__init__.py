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


def _register_deepspeed() -> None:
    """DeepSpeed JSON `"optimizer": {"type": "GaLoreAdamW"}` (galore_ds/distributed/deepspeed.py).

    Cheap: sets the names in torch.optim; the engine hooks are installed now if deepspeed is
    already imported, else when the optimizer is first constructed."""
    import sys

    from galore_ds.distributed import deepspeed as _ds

    _ds.register_names()
    if "deepspeed" in sys.modules:
        _ds.register(quiet=True)


_register_deepspeed()
__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "GaLoreOptimizer", "param_groups"]
