"""Adapters that make the public optimizers reachable from the tools people train with:
DeepSpeed (deepspeed.py), and the Hugging Face Trainer, Accelerate and torchtitan. Each
imports its tool lazily and says which extra to install when it is missing."""
