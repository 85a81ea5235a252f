"""`ray job submit` entrypoint for a Ray Tune sweep.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/tune.py --config configs/tune_demo.yaml num_samples=16
    ray job submit ... -- python ray_jobs/tune.py --resume tune-demo

The job's driver runs on the cluster's head node and joins the cluster it runs in; trials are placed on
the cluster's workers.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds mpmae/

from mpmae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
