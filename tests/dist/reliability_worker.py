"""launch/train.py under torchrun, with injected faults. NAN_AT: rank NAN_RANK's loss is NaN in
step NAN_AT. KILL_AT: on the first attempt
(TORCHELASTIC_RESTART_COUNT == 0) rank KILL_RANK SIGKILLs itself inside optimizer step
KILL_AT (1-based, counted from the start of this attempt). torchrun --max-restarts then
restarts every rank, and they resume from the latest checkpoint (--resume)."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    spec = importlib.util.spec_from_file_location("galore_launch_train", ROOT / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
            and os.environ.get("RANK") == os.environ.get("KILL_RANK", "1"):
        from galore_ds.train.engines.base import engine_class

        cls = engine_class(os.environ.get("KILL_ENGINE", "fsdp"))
        real = cls.train_step
        calls = {"n": 0}

        def train_step(self, micro_batches):
            calls["n"] += 1
            if calls["n"] == kill_at:
                # between checkpoints: the other rank is already inside this step's collectives
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, micro_batches)

        cls.train_step = train_step
    nan_at = int(os.environ.get("NAN_AT", "0"))
    if nan_at and os.environ.get("RANK") == os.environ.get("NAN_RANK", "1"):
        # this rank's loss (so its gradient, so the reduced gradient) is NaN in step NAN_AT only
        from galore_ds.train.engines.base import engine_class

        cls = engine_class(os.environ.get("KILL_ENGINE", "fsdp"))
        real_step = cls.train_step
        count = {"n": 0}

        def poisoned(self, micro_batches):
            count["n"] += 1
            if count["n"] != nan_at:
                return real_step(self, micro_batches)
            h = self.model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
            try:
                return real_step(self, micro_batches)
            finally:
                h.remove()

        cls.train_step = poisoned
    return launch.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
