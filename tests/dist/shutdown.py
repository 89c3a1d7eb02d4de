"""End a multi-process test worker without tripping over teardown races."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def exit_worker(code: int = 0) -> None:
    """Destroy the process group, flush, and leave with os._exit.

    A normal interpreter exit after gloo + bitsandbytes sometimes aborts in a C++ destructor
    ("terminate called without an active exception", seen once in CI on a 2-core machine);
    the worker's results are already written, so nothing after this point matters to the test."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
