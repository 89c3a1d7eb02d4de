"""Metrics: one JSON object per line (rank 0 only), a tqdm progress bar, and optionally the
same numbers as TensorBoard scalars (<run_dir>/tensorboard) and W&B (offline or online).

Train lines: {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "mem_gb", ...};
eval lines: {"step", "eval_loss", "eval_ppl"}. A resumed run appends to the same file (and the
same TensorBoard directory and W&B run)."""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True, tensorboard: bool = False, wandb: str = "off",
                 wandb_project: str = "galore_ds", config: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if wandb != "off":
            import wandb as wb

            # one W&B run per run_dir: its id is kept there, so a resumed run continues it
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wb.init(project=wandb_project, dir=str(run_dir), id=run_id, resume="allow",
                                 mode=wandb, config=config, name=run_dir.name)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        scalars = {k: v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(record.get("step", 0))
        if self.tb is not None:
            section = "eval" if "eval_loss" in record else "train"
            for key, value in scalars.items():
                self.tb.add_scalar(f"{section}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

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
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
