"""launch/train.py, each optimizer step slowed by STEP_SLEEP seconds, so that a test can make a
node leave and another join while training runs (tests/test_ddp.py)."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    spec = importlib.util.spec_from_file_location("galore_launch_train", ROOT / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    from galore_ds.train.engines.ddp import DDPEngine

    real, pause = DDPEngine.train_step, float(os.environ.get("STEP_SLEEP", "0"))

    def slow(self, micro_batches):
        time.sleep(pause)
        return real(self, micro_batches)

    DDPEngine.train_step = slow
    return launch.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
