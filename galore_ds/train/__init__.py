"""Training from a JSON recipe: config (the recipe's schema and validation), model, data,
engines/ (one per engine.mode, sharing engines/base.py), optim (the optimizer a recipe names),
scheduler, checkpoint, faults, metrics, and the train loop (trainer.py).

Kept import-light on purpose: nothing here is imported before the recipe is validated."""
