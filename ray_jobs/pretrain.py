"""`ray job submit` entrypoint for pretraining.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/pretrain.py --config configs/demo.yaml optim.epochs=2

The job's driver runs on the cluster's head node, where ``ray.init()`` joins the cluster it runs in.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds mpmae/

from mpmae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
