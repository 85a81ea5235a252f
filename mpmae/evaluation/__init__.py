"""Evaluation building blocks shared by pretraining probes, fine-tuning and the CLI: GEO-Bench task losses
and split metrics, the linear probe, the probe a pretraining run scores itself with, the probe table."""
