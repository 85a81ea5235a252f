"""What every Ray Train run here shares, pretraining and fine-tuning alike: its RunConfig (storage,
retries, no retries of lasting errors), ``fit`` with readable errors, reports with checkpoints, and the
worker-side settings (quiet report logs, channels-last weights, torch.compile)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from mpmae.checkpoint import reporting_full_disk
from mpmae.config import RunConfig
from mpmae.storage import StoreUnavailableError

Module = TypeVar("Module", bound=torch.nn.Module)


def lasting_error(error: BaseException) -> ValueError | None:
    """The ValueError inside a worker's or a run's error (bad data, config or checkpoint), else None.

    Such an error comes back on every retry. Ray wraps it: a Ray Data task's failure as a RayTaskError
    (``cause``), a failed run as a WorkerGroupError (``worker_failures``) or ControllerError.
    """
    from ray.exceptions import RayError

    pending: list[Any] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ValueError) and not isinstance(current, RayError):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        pending += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                    getattr(current, "_base_exc", None), current.__cause__, *(failures[r] for r in sorted(failures))]
    return None


class FailFast(ray.train.UserCallback):
    """Ends a run at its first lasting worker error (:func:`lasting_error`) instead of retrying it.

    Train's failure policy retries every worker error ``max_failures`` times, from the latest checkpoint;
    a ControllerError whose cause is not one of Train's own startup errors it never retries.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = lasting_error(worker_exceptions[rank])
            if error is not None:
                raise ray.train.ControllerError(error)


def train_run_config(run: RunConfig, name: str, callbacks: Sequence[Any] = ()) -> ray.train.RunConfig:
    """Ray Train's RunConfig of a run: storage, checkpoints kept, retries (none for lasting errors; lost
    nodes and preemptions resume from the latest checkpoint, preemptions counted on their own), and Ray
    Train's own logs at WARNING (at INFO every rank logs each report's whole metrics dict)."""
    # The ignores: mypy sees ray.train's V1 RunConfig, since ray/train/__init__.py rebinds the V2 one (what
    # runs here) under ``if is_v2_enabled():``.
    return ray.train.RunConfig(
        name=name,
        storage_path=run.storage,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
        failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
            max_failures=run.max_failures, max_preemption_failures=run.max_preemptions),
        callbacks=[FailFast(), *callbacks],  # type: ignore[list-item]
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``; a run ended by a lasting error raises that error itself, and one ended by a store
    that stopped answering raises :class:`~mpmae.storage.StoreUnavailableError` naming the run's storage
    (one line each in the CLI)."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        error = lasting_error(err)
        if error is not None:
            raise _own_message(error) from None
        lost = _store_error(err)
        if lost is None:
            raise
        where = trainer.run_config.storage_path
        raise StoreUnavailableError(f"{where}: the store did not answer while Ray Train wrote the run "
                                    f"({str(lost).strip().splitlines()[0]}); the checkpoints already whole "
                                    "stay loadable: run again to resume") from None


def _store_error(error: BaseException) -> OSError | None:
    """The object store's error (pyarrow's OSError, "AWS Error ...") inside a failed run's error, else None."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and ("AWS Error" in str(current) or "google::cloud" in str(current)):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        pending += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                    current.__cause__, current.__context__, *failures.values()]
    return None


def _own_message(error: ValueError) -> ValueError:
    """``error`` with its own message only: Ray Data appends lines of retry advice to a failed read's error."""
    message = str(error).split("\n", 1)[0]
    try:
        return type(error)(message)
    except Exception:  # a constructor that wants more than a message
        return ValueError(message)


def data_config() -> ray.train.DataConfig:
    """Train's default ingest options without ``exclude_resources``, whose mere mention Ray Data deprecates."""
    options = ray.data.DataContext.get_current().execution_options
    return ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(
        resource_limits=options.resource_limits, preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    ))


def channels_last(model: Module) -> Module:
    """``model`` with its convolution weights in the channels-last layout of the activations they see.

    The encoder runs channels-last, so conv backward makes channels-last weight gradients. A depthwise
    weight (C, 1, k, k) is the one shape where autograd keeps such a gradient although its strides differ
    from the contiguous weight's (only in the size-1 dimension); DDP then finds the gradient's strides
    unlike its bucket view's and warns ("Grad strides do not match bucket view strides"). Weights in the
    layout of their gradients match in every dimension. Only convolutions: other 4-d parameters (GRN's
    (1, 1, 1, C) scales) act on channels-last maps permuted to NHWC and get contiguous gradients.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return model


def compiled(model: Module, enabled: bool) -> Module:
    """``model`` with its forward compiled by ``torch.compile`` when ``enabled``; in place, traced at the first call.

    ``Module.compile`` rather than ``torch.compile(model)``: that wraps the model in an ``OptimizedModule``
    whose state dict prefixes every key with ``_orig_mod.``, and checkpoints, resuming and ``unwrap`` want
    the MPMAE's own keys. Compiled before DDP wraps it, the model still gets Dynamo's DDP graph splitting
    (it looks for the DDP forward it runs under), which lets the gradient all-reduce overlap the backward.
    """
    if enabled:
        model.compile()
    return model


def quiet_report_logs() -> None:
    """Keep Ray Train's per-report log line (each rank, each report, the whole metrics dict) out of the log.

    Ray Train 2.60 names that logger by its file's path (``ray/train/v2/_internal/execution/context.py``)
    rather than ``ray.train...``, so the RunConfig's ``LoggingConfig``, which sets the level of Ray
    Train's loggers, misses it, and the root logger Ray Train sets up in each worker passes it at INFO.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _storage_place(name: str) -> str:
    """Where Ray copies checkpoint ``name`` of this run in storage."""
    return ray.train.get_context().get_storage().build_checkpoint_path_from_name(name)


def report_with_checkpoint(metrics: dict[str, Any], rank: int, write: Callable[[Path], Any], name: str,
                           upload_async: bool = False) -> None:
    """Every rank reports (Ray's barrier); rank 0 writes the checkpoint folder and attaches it.

    With ``upload_async``, Ray copies the folder into storage in the background (and removes it after):
    the step loop waits only for the local write. Ray copies ``complete.json`` with the rest, and readers
    take only a folder whose files match it, so an upload cut short is never taken for a checkpoint.
    A full disk while Ray copies the folder (synchronously) is one line naming the place.
    """
    from ray.train import CheckpointUploadMode

    if upload_async:
        checkpoint = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="mpmae-checkpoint-")  # Ray deletes it once uploaded
            write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        with reporting_full_disk(_storage_place(name) if rank == 0 else name, "copying the checkpoint into storage"):
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
