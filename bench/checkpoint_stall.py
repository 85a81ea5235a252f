"""How long the step loop stalls per checkpoint when checkpoints go to an object store: Ray Train's
synchronous upload (``run.async_upload=false``) against its asynchronous one (the default).

An S3-compatible server (moto's, from the dev extras) runs on loopback; one TorchTrainer worker pretrains
atto on a synthetic folder with a checkpoint every ``--every`` steps into a bucket, once per mode. The stall
is the time each checkpoint keeps the loop from its next step (write, then the report with its upload, or
only the write when the upload runs in the background), as the run itself records it
(``checkpoint_stall_s`` over ``checkpoints`` in its last report).

    .venv/bin/python bench/checkpoint_stall.py [--quick] [--tiles 160] [--every 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpmae.config import PretrainConfig, load_config
from mpmae.data.synth import write_synthetic_mmearth

BATCH = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_store() -> subprocess.Popen:
    """moto's S3 server on a free loopback port, its endpoint and test credentials in the environment."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def _config(data: Path, every: int, mode: str) -> PretrainConfig:
    return load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"data.path={data}", "run.storage_path=s3://bench/runs", f"run.name={mode}", f"optim.batch_size={BATCH}",
        "optim.epochs=1", "run.num_workers=1", "run.cpus_per_worker=2", f"run.checkpoint_every_steps={every}",
        f"run.async_upload={'true' if mode == 'async' else 'false'}", "run.keep_checkpoints=2",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=160)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="80 tiles (4 steps, a checkpoint at step 2): a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tiles = 80
    import ray

    from mpmae.runtime.instance import ensure_ray
    from mpmae.train.trainer import pretrain

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = start_store()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_synthetic_mmearth(Path(tmp) / "data", tiles=args.tiles, seed=0)
            ensure_ray(object_store_memory=400 * 1024**2, log_to_driver=False)
            figures = {}
            for mode in ("sync", "async"):
                metrics = pretrain(_config(data, args.every, mode)).metrics
                figures[mode] = metrics["checkpoint_stall_s"] / max(1, metrics["checkpoints"])
                print(f"{mode:>5} upload: {figures[mode]:6.3f} s stall per checkpoint "
                      f"({metrics['checkpoints']} checkpoints before the last report)")
            ray.shutdown()
    finally:
        server.terminate()
    print(json.dumps({"bench": "checkpoint_stall", "every_steps": args.every, "batch": BATCH,
                      "sync_stall_s": round(figures["sync"], 3), "async_stall_s": round(figures["async"], 3),
                      "tiles": args.tiles, "quick": args.quick}))


if __name__ == "__main__":
    main()
