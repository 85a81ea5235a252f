"""The `mpmae` command line: parse arguments, call the library, print.

Errors a user can fix (a bad key, file or path, a full disk, a refused permission) end in one line on
stderr, not a traceback: bad input exits 2, a full disk or a refused permission exits 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """\
Pretrain the MMEarth Multi-Pretext Masked Autoencoder (MP-MAE) on Ray, and evaluate it.

mpmae checks and converts MMEarth data folders, pretrains a ConvNeXt V2 encoder on Ray Train (one machine
or a cluster), exports the encoder with a model card, probes or fine-tunes it on GEO-Bench tasks, and
sweeps pretraining configs with Ray Tune, ranked by a probe score."""

EPILOG = """\
typical workflow:
  mpmae synth runs/demo-data --tiles 200      a small synthetic MMEarth folder (or use real MMEarth data)
  mpmae inspect runs/demo-data                check a folder and print a summary
  mpmae shard runs/demo-data runs/shards      optional: Parquet or FFCV shards for faster loading
  mpmae pretrain --config configs/demo.yaml   pretrain; key=value overrides follow, e.g. optim.epochs=10
  mpmae export runs/demo runs/demo-export     the encoder and its model card
  mpmae import checkpoint-199.pth runs/mm     or: a released MMEarth checkpoint as an export
  mpmae probe --checkpoint runs/demo-export --task land_cover --data runs/demo-data
  mpmae finetune --config configs/linear_probe_so2sat.yaml encoder=runs/demo-export
  mpmae tune --config configs/tune_demo.yaml  a Ray Tune sweep of pretraining configs
  mpmae benchmark --config configs/geobench_suite.yaml   encoders x tasks x seeds, IQM with intervals

environment:
  RAY_ADDRESS    the Ray cluster to join; unset, pretrain/finetune/tune/benchmark start a local instance
  GEO_BENCH_DIR  the GEO-Bench root, for probe, finetune and benchmark tasks other than land_cover
  GRAFANA_TOKEN  a Grafana service account token, for `mpmae dashboards provision`

`mpmae COMMAND --help` lists a command's options. Bad input exits 2 with one line naming the key or file."""


def _inspect(args: argparse.Namespace) -> None:
    from mpmae.data.inspect import inspect_folder

    print("\n".join(inspect_folder(args.folder, sample=args.sample).lines()))


def _synth(args: argparse.Namespace) -> None:
    from mpmae.data.synth import write_synthetic_mmearth

    out = write_synthetic_mmearth(
        args.out, tiles=args.tiles, size=args.size, seed=args.seed, overwrite=args.overwrite, progress=True
    )
    print(f"wrote {args.tiles} synthetic tiles of {args.size} px to {out}")


def _shard(args: argparse.Namespace) -> int:
    import os

    from mpmae.data.shards import write_shards
    from mpmae.storage import StoreUnavailableError

    parallel = False
    if args.ray:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            import ray

            if not ray.is_initialized():
                ray.init(address=address)
            parallel = True
        else:
            print("mpmae shard: RAY_ADDRESS is unset: writing the shards in this process", file=sys.stderr)
    try:
        paths = write_shards(
            args.folder,
            args.out,
            format=args.format,
            split=args.split,
            modalities=args.modalities,
            overwrite=args.overwrite,
            progress=True,
            parallel=parallel,
            **({"tiles_per_shard": args.tiles_per_shard} if args.tiles_per_shard is not None else {}),
        )
    except StoreUnavailableError as err:  # the store did not answer: not the input's fault
        print(f"mpmae shard: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} {args.format} shard(s) to {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> None:
    from mpmae.config import PretrainConfig, load_config

    config = load_config(PretrainConfig, args.config, args.overrides)  # before Ray is imported: fails fast
    from mpmae.train.trainer import pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = pretrain(config)
    print(f"run finished: {result.path}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")


def _export(args: argparse.Namespace) -> None:
    from mpmae.export import export_encoder, export_files

    out = export_encoder(args.checkpoint, args.out, layout=args.layout)
    print(f"wrote {', '.join(export_files(args.layout))} to {out}")


def _import(args: argparse.Namespace) -> None:
    from mpmae.export import export_files, import_reference

    out = import_reference(args.file, args.out)
    print(f"wrote {', '.join(export_files())} to {out}")


def _visualize(args: argparse.Namespace) -> None:
    from mpmae.viz import visualize

    for path in visualize(args.checkpoint, args.data, args.out, tiles=args.tiles):
        print(path)


def _finetune(args: argparse.Namespace) -> None:
    from mpmae.config import FinetuneConfig, load_config

    config = load_config(FinetuneConfig, args.config, args.overrides)
    from mpmae.finetune.run import finetune
    from mpmae.tables import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = finetune(config)
    print(format_table([results], ["task", "mode", "encoder", "selected_epoch", "val_metric", "test_metric"]))


def _probe(args: argparse.Namespace) -> None:
    import json

    import mpmae.storage as storage
    from mpmae.evaluation.probe_table import probe_table
    from mpmae.tables import format_table

    if args.out is not None:
        storage.check_reachable(args.out, "--out")
        if storage.exists(args.out):
            raise FileExistsError(f"{args.out} already exists; choose another --out")
    encoders = [*args.checkpoint, *([None] if args.random else [])]
    if not encoders:
        raise ValueError("give at least one --checkpoint, or --random")
    rows = probe_table(encoders, args.task, data=args.data, geobench_dir=args.geobench_dir, epochs=args.epochs)
    print(format_table(rows, ["encoder", "task", "train_samples", "test_samples", "score"]))
    if args.out is not None:  # never overwritten (a file that appeared meanwhile is refused too)
        storage.write_bytes(args.out, json.dumps(rows, indent=2, default=float).encode())


def _tune(args: argparse.Namespace) -> None:
    from mpmae.config import SweepConfig, load_config
    from mpmae.tune.sweep import resume, tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.resume is not None:
        if args.config is not None or args.overrides:
            raise ValueError("--resume takes no --config or overrides: the sweep folder holds its config")
        summary = resume(args.resume, args.storage_path)
    else:
        summary = tune(load_config(SweepConfig, args.config, args.overrides))
    print(f"sweep folder: {summary['folder']}")


def _benchmark(args: argparse.Namespace) -> int:
    from mpmae.config import BenchmarkConfig, load_config

    config = load_config(BenchmarkConfig, args.config, args.overrides)  # before Ray is imported: fails fast
    from mpmae.benchmark.suite import CellsFailedError, run_benchmark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run_benchmark(config)
    except CellsFailedError as err:  # not the input's fault, and the finished cells are kept
        print(f"mpmae benchmark: error: {err}", file=sys.stderr)
        return 1
    print(result["markdown"], end="")
    print(f"\n{result['ran']} cell(s) run now, {result['reused']} finished before; files in {result['folder']}")
    return 0


def _cluster_validate(args: argparse.Namespace) -> int:
    from mpmae.cluster import cli_validate

    return cli_validate(args.files)


def _dashboards_render(args: argparse.Namespace) -> int:
    from mpmae.dashboards import cli_render

    return cli_render(args.out)


def _dashboards_provision(args: argparse.Namespace) -> int:
    from mpmae.dashboards import cli_provision

    return cli_provision(args.url, args.folder, insecure=args.insecure)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `mpmae` subcommand."""
    parser = argparse.ArgumentParser(prog="mpmae", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="validate an MMEarth folder and print a summary")
    inspect.add_argument("folder", type=Path)
    inspect.add_argument("--sample", type=int, default=256, help="tiles read to measure no-data shares")
    inspect.set_defaults(run=_inspect)

    synth = commands.add_parser("synth", help="write a learnable synthetic MMEarth v001 folder")
    synth.add_argument("out", type=Path)
    synth.add_argument("--tiles", type=int, required=True)
    synth.add_argument("--size", type=int, choices=(64, 128), default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a folder mpmae synth wrote (refuses one holding anything else)")
    synth.set_defaults(run=_synth)

    shard = commands.add_parser(
        "shard", help="convert a folder into Parquet or FFCV training shards",
        description="Convert one split of a local MMEarth folder into Parquet or FFCV shards in OUT, a folder or "
                    "an object-store URI (s3://bucket/prefix; endpoint and credentials from AWS_ENDPOINT_URL, "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...). A manifest is written last; readers use only "
                    "sets that have one. Rerun after an interruption to resume: shards of the same run are kept.")
    shard.add_argument("folder", type=Path, help="a local MMEarth folder")
    shard.add_argument("out", type=str, help="output folder or URI (s3://bucket/prefix)")
    shard.add_argument("--format", choices=("parquet", "ffcv"), default="parquet")
    shard.add_argument("--split", choices=("train", "val", "test"), default="train")
    shard.add_argument("--tiles-per-shard", type=int,
                       help="tiles per shard (default: mpmae.data.shards.DEFAULT_TILES_PER_SHARD)")
    shard.add_argument("--modalities", default="all_mod", help="preset or comma-free modality name")
    shard.add_argument("--overwrite", action="store_true",
                       help="replace an existing shard set of this split (refuses files mpmae did not write)")
    shard.add_argument("--ray", action="store_true",
                       help="write each shard as a Ray task of the cluster at RAY_ADDRESS, on this machine's node "
                            "(which holds the h5); without RAY_ADDRESS the shards are written in this process")
    shard.set_defaults(run=_shard)

    pretrain = commands.add_parser("pretrain", help="pretrain on Ray (RAY_ADDRESS, or a local instance)")
    pretrain.add_argument("--config", type=Path, help="a YAML file from configs/ (defaults apply without)")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=10")
    pretrain.set_defaults(run=_pretrain)

    export = commands.add_parser("export", help="write a checkpoint's encoder and its model card")
    export.add_argument("checkpoint", help="a checkpoint folder or state.pt, or a run folder (its newest complete "
                                           "checkpoint); a path or a URI such as s3://bucket/runs/demo")
    export.add_argument("out", help="the export folder, a path or a URI (an existing export there is never "
                                    "overwritten)")
    export.add_argument("--layout", choices=("mpmae", "mmearth"), default="mpmae",
                        help="mmearth: also write mmearth.pth, the encoder in the original MMEarth project's "
                             "checkpoint layout (for its fine-tuning code)")
    export.set_defaults(run=_export)

    import_ = commands.add_parser(
        "import", help="turn a checkpoint of the original MMEarth project into an encoder export",
        description="Write the encoder of a checkpoint of the original MMEarth project (vishalned/MMEarth-train, "
                    "such as a released checkpoint-199.pth; dense or MinkowskiEngine weights) as an export folder "
                    "with a model card, as mpmae export does. The architecture comes from the file's weights "
                    "(checked against its args); it is loaded without running code from it.")
    import_.add_argument("file", help="the checkpoint file, a path or a URI")
    import_.add_argument("out", help="the export folder, a path or a URI (an existing export there is never "
                                     "overwritten)")
    import_.set_defaults(run=_import)

    visualize = commands.add_parser("visualize", help="reconstruction PNGs and loss curves of a checkpoint")
    visualize.add_argument("checkpoint", help="a checkpoint folder or state.pt, or a run folder; a path or a URI")
    visualize.add_argument("data", help="a local MMEarth folder (h5 files, not a URI) to draw tiles from")
    visualize.add_argument("--out", required=True,
                           help="the output folder, a path (its files rewritten) or a URI (files already "
                                "there are never replaced)")
    visualize.add_argument("--tiles", type=int, default=4)
    visualize.set_defaults(run=_visualize)

    finetune = commands.add_parser("finetune", help="linear-probe or fine-tune on a GEO-Bench task on Ray")
    finetune.add_argument("--config", type=Path, help="a YAML file (defaults apply without)")
    finetune.add_argument("overrides", nargs="*", help="key=value, e.g. task=m-so2sat encoder=export/")
    finetune.set_defaults(run=_finetune)

    probe = commands.add_parser("probe", help="quick in-process linear probes of encoders, side by side")
    probe.add_argument("--checkpoint", action="append", default=[],
                       help="an export folder, checkpoint or run folder, or a checkpoint file of the original "
                            "MMEarth project; a path or a URI (repeatable)")
    probe.add_argument("--random", action="store_true", help="also probe a randomly initialised encoder")
    probe.add_argument("--task", required=True, help="a GEO-Bench task, or land_cover (needs --data)")
    probe.add_argument("--data", type=Path, help="MMEarth folder for the held-out land_cover task")
    probe.add_argument("--geobench-dir", help="GEO-Bench root (default $GEO_BENCH_DIR)")
    probe.add_argument("--epochs", type=int, default=100)
    probe.add_argument("--out", help="write the table as JSON here, a path or a URI (never overwritten)")
    probe.set_defaults(run=_probe)

    tune = commands.add_parser("tune", help="Ray Tune sweep of pretraining configs, ranked by a probe score")
    tune.add_argument("--config", type=Path, help="a sweep YAML, e.g. configs/tune_demo.yaml")
    tune.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME")
    tune.add_argument("--storage-path", default="runs",
                      help="where --resume finds the sweep, a path or a URI (default runs)")
    tune.add_argument("overrides", nargs="*", help="key=value, e.g. num_samples=4 scheduler.type=fifo")
    tune.set_defaults(run=_tune)

    benchmark = commands.add_parser(
        "benchmark", help="every encoder on every task, partition, seed and mode on Ray, the table with intervals",
        description="Evaluate every encoder of a suite config on every task, partition, seed and mode (linear "
                    "probe, fine-tune), one Ray task per cell, and write results.csv, summary.json, summary.md and "
                    "summary.png under <storage_path>/<name>: the IQM over seeds with stratified-bootstrap intervals, "
                    "and a normalised aggregate over tasks. Finished cells are kept: rerun to resume; a finished "
                    "suite reruns nothing.")
    benchmark.add_argument("--config", type=Path, help="a suite YAML, e.g. configs/geobench_suite.yaml")
    benchmark.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0,1] encoders.mine=runs/mine-export")
    benchmark.set_defaults(run=_benchmark)

    cluster = commands.add_parser("cluster", help="cluster launcher YAMLs and KubeRay manifests")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    validate = cluster_commands.add_parser("validate", help="check files with Ray's schema and our rules")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(run=_cluster_validate)

    dashboards = commands.add_parser("dashboards", help="Grafana dashboards of the training metrics")
    dashboards_commands = dashboards.add_subparsers(dest="dashboards_command", required=True)
    render = dashboards_commands.add_parser("render", help="write the dashboard JSON files")
    render.add_argument("--out", type=Path, help="output folder (default dashboards/)")
    render.set_defaults(run=_dashboards_render)
    provision = dashboards_commands.add_parser(
        "provision", help="create or update the dashboards through Grafana's API (token: $GRAFANA_TOKEN)")
    provision.add_argument("--url", required=True, help="Grafana's base URL")
    provision.add_argument("--folder", default="mpmae", help="Grafana folder (default mpmae)")
    provision.add_argument("--insecure", action="store_true",
                           help="allow http:// to a host that is not loopback (the token travels in clear text)")
    provision.set_defaults(run=_dashboards_provision)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mpmae` console script: one line on stderr instead of a traceback for bad input
    (exit 2), a full disk or a refused permission (exit 1)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"mpmae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        message = environment_error(err)
        if message is None:
            raise
        print(f"mpmae {args.command}: error: {message}", file=sys.stderr)
        return 1
    return status or 0


def environment_error(err: BaseException) -> str | None:
    """One line for a full disk, a refused permission or a store that stays away anywhere in ``err``'s chain
    (Ray wraps a worker's error in its own), naming the path; None for anything else."""
    from mpmae.storage import StoreUnavailableError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StoreUnavailableError):
            return str(current)
        if isinstance(current, PermissionError) or (isinstance(current, OSError) and current.errno == errno.ENOSPC):
            reason = "permission denied" if isinstance(current, PermissionError) else "no space left on device"
            return f"{current.filename}: {reason}" if current.filename is not None else f"{reason} ({current})"
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
