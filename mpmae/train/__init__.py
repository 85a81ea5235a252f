"""Pretraining: optimiser recipe, the step function, checkpoints and the Ray Train assembly."""
