"""GEO-Bench evaluation: split-level metrics, losses, linear probing and fine-tuning (spec 5)."""

from mpmae.evaluation.linear_probe import extract_features, linear_probe, score_head, train_head
from mpmae.evaluation.split_metrics import MeanIoU, MulticlassAccuracy, MultilabelF1, make_metric
from mpmae.evaluation.task_losses import make_loss
from mpmae.export import load_encoder, set_drop_path
from mpmae.finetune.finetune import Classifier, FinetuneConfig, Finetuner, FitResult, evaluate, fit
from mpmae.optim import WarmupCosine, layer_decay_groups, layer_id

__all__ = [
    "Classifier",
    "FinetuneConfig",
    "Finetuner",
    "FitResult",
    "MeanIoU",
    "MulticlassAccuracy",
    "MultilabelF1",
    "WarmupCosine",
    "evaluate",
    "extract_features",
    "fit",
    "layer_id",
    "linear_probe",
    "load_encoder",
    "make_loss",
    "make_metric",
    "layer_decay_groups",
    "score_head",
    "set_drop_path",
    "train_head",
]
