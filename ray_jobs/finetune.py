"""`ray job submit` entrypoint for GEO-Bench evaluation runs.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/finetune.py --config configs/finetune_bigearthnet.yaml encoder=exports/all_mod
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds mpmae/

from mpmae.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
