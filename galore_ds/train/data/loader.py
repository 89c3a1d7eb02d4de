"""Which sequences each rank sees at each step.

The global order is a fixed function of (seed, epoch): a permutation of the packed sequences
per epoch. Step s consumes global samples [s*G, (s+1)*G); rank r takes its contiguous slice
of G / world_size, cut into micro-batches. The only state is `position` (global samples
consumed), saved in checkpoints, so a resume (even with another world size) sees exactly the
sequences an uninterrupted run would have seen.
"""
from __future__ import annotations

import torch

from galore_ds.train.config import ConfigError
from galore_ds.train.data.packing import PackedDataset


class StepLoader:
    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, seed: int = 0) -> None:
        assert global_batch % (micro_batch * world_size) == 0
        self.ds, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = 0  # global samples consumed
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.ds), generator=g), epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        n, out = len(self.ds), []
        for k in range(start, start + count):
            out.append(int(self._perm_for(k // n)[k % n]))
        return out

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        per_rank = self.global_batch // self.world_size
        idx = self.indices(self.position + self.rank * per_rank, per_rank)
        self.position += self.global_batch
        return [self.ds.batch(idx[i: i + self.micro_batch]) for i in range(0, per_rank, self.micro_batch)]

    @property
    def epoch(self) -> float:
        return self.position / len(self.ds)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        if "doc" in sd:  # a stream cursor (galore_ds.train.data.streaming): positions mean other rows
            raise ConfigError("data.streaming", "the checkpoint's data position was written by the "
                              "streaming loader (data.streaming=true)",
                              "resume with the data.streaming setting that wrote it")
        self.position = int(sd["position"])


EVAL_WEIGHT = "eval_weight"


def eval_batches(dataset: PackedDataset, n_batches: int, micro_batch: int, rank: int,
                 world_size: int) -> list[dict[str, torch.Tensor]]:
    """The same fixed eval sequences on every world size: the first n_batches*micro_batch of
    the eval set (wrapping if it is smaller), rank r taking micro-batches r, r+W, ...

    Every rank gets ceil(n_batches / W) batches, because a sharded forward (FSDP2, ZeRO-3) is
    a collective every rank must join; a rank's extra batch repeats one of its own with
    EVAL_WEIGHT 0, and engines average the weighted losses over all ranks."""
    n = len(dataset)
    if n == 0 or n_batches == 0:
        return []
    per_rank = -(-n_batches // world_size)
    out = []
    for k in range(per_rank):
        b = rank + k * world_size
        real = b < n_batches
        b = b if real else rank % n_batches
        batch = dataset.batch([(b * micro_batch + i) % n for i in range(micro_batch)])
        batch[EVAL_WEIGHT] = torch.tensor(1.0 if real else 0.0)
        out.append(batch)
    return out
