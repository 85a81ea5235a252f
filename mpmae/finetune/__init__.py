"""GEO-Bench evaluation: split-level metrics, losses, linear probing and fine-tuning (spec 5)."""

from mpmae.finetune.encoder import load_encoder, set_drop_path
from mpmae.finetune.finetune import Classifier, FinetuneConfig, Finetuner, FitResult, evaluate, fit
from mpmae.finetune.losses import make_loss
from mpmae.finetune.metrics import MeanIoU, MulticlassAccuracy, MultilabelF1, TaskKind, make_metric
from mpmae.finetune.optim import WarmupCosine, layer_id, param_groups
from mpmae.finetune.probe import extract_features, linear_probe, score_head, train_head

__all__ = [
    "Classifier",
    "FinetuneConfig",
    "Finetuner",
    "FitResult",
    "MeanIoU",
    "MulticlassAccuracy",
    "MultilabelF1",
    "TaskKind",
    "WarmupCosine",
    "evaluate",
    "extract_features",
    "fit",
    "layer_id",
    "linear_probe",
    "load_encoder",
    "make_loss",
    "make_metric",
    "param_groups",
    "score_head",
    "set_drop_path",
    "train_head",
]
