"""Pretraining on Ray Train: the driver-side assembly (data checks, TorchTrainer), the per-worker loop and
its guarded step."""
