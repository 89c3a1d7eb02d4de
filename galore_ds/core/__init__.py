"""The math: projector refresh and projection, update rules, parameter groups. Imports torch
only (no torch.distributed); galore_ds/layouts decides how the math meets sharded parameters."""
