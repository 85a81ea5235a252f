"""Fine-tuning on GEO-Bench: the in-process fine-tuner and the Ray Train evaluation run (docs/method.md,
Fine-tuning and linear probing recipe)."""
