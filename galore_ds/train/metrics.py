"""Metrics: one JSON object per line (rank 0 only) and a tqdm progress bar.

Train lines: {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "mem_gb", ...};
eval lines: {"step", "eval_loss", "eval_ppl"}. A resumed run appends to the same file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True) -> None:
        self.enabled = enabled
        self.file = None
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")

    def progress(self, n: int, postfix: Optional[dict[str, str]] = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
