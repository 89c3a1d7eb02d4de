"""Loss curves from metrics.jsonl files:

    python -m galore_ds.tools.plot runs/tiny/metrics.jsonl [runs/other/metrics.jsonl ...] -o loss.png

Train loss per step (lightly smoothed) as a line per run, eval loss as markers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("loss") is not None:
            train.append(r)
        if r.get("eval_loss") is not None:
            evals.append(r)
    return train, evals


def smooth(values: list[float], alpha: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def plot(paths: list[str], output: str, labels: list[str] | None = None, alpha: float = 0.8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, path in enumerate(paths):
        label = labels[i] if labels and i < len(labels) else Path(path).parent.name or str(path)
        train, evals = read_metrics(path)
        if train:
            line, = ax.plot([r["step"] for r in train], smooth([r["loss"] for r in train], alpha), label=f"{label} train")
            color = line.get_color()
        else:
            color = None
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=color,
                    label=f"{label} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot loss curves from metrics.jsonl")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("-o", "--output", default="loss.png")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--smooth", type=float, default=0.8, help="EMA factor for the train loss (0 = raw)")
    a = p.parse_args(argv)
    missing = [m for m in a.metrics if not Path(m).is_file()]
    if missing:
        print(f"error: {missing[0]}: no such file; pass the metrics.jsonl of a run (runs/<name>/metrics.jsonl)")
        return 2
    plot(a.metrics, a.output, a.labels, a.smooth)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
