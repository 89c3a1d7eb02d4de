"""Training: the engine protocol and registry (engine.py), the single-process engine,
the LR schedule, checkpoints, metrics, and the train loop (trainer.py).

Kept import-light on purpose: nothing here is imported before the recipe is validated."""
