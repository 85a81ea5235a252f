"""Cell files: written whole into a folder or a bucket, read back as finished cells, never overwritten, and
refused when they ran with other settings."""

from __future__ import annotations

import pytest

from mpmae.benchmark.plan import Cell, cell_spec, finished_rows, plan_cells, suite_folder, write_cell
from mpmae.config import BenchmarkConfig, ConfigError, load_config
from tests.conftest import S3Store


def test_cell_files_in_a_bucket_are_read_back_and_never_overwritten(s3: S3Store) -> None:
    bucket = s3.bucket("benchmark")
    config = load_config(BenchmarkConfig, None, [f"storage_path={bucket}/suites", "name=b", "encoders={a: null}",
                                                 "seeds=[0, 1]"])
    first, second = plan_cells(config)
    assert finished_rows(config, [first, second]) == {}
    folder = suite_folder(config)
    assert folder == f"{bucket}/suites/b"
    assert write_cell(folder, first, cell_spec(config, first), {"test_metric": 0.5}) == {"test_metric": 0.5}
    # a second driver finishing the same cell keeps the file that is there
    assert write_cell(folder, first, cell_spec(config, first), {"test_metric": 0.9}) == {"test_metric": 0.5}
    assert finished_rows(config, [first, second]) == {first: {"test_metric": 0.5}}
    changed = load_config(BenchmarkConfig, None, [f"storage_path={bucket}/suites", "name=b", "encoders={a: null}",
                                                  "seeds=[0, 1]", "arch=femto", "linear_probe.smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"a__m-bigearthnet__linear_probe__default__seed-0.json: a on m-bigearthnet "
                                          r"\(linear_probe, default, seed 0\) ran with other settings than the config "
                                          r"asks \(arch 'atto' -> 'femto', recipe.smoothing 0.2 -> 0.1\)"):
        finished_rows(changed, [first])


def test_cells_are_named_by_encoder_task_mode_partition_and_seed() -> None:
    config = BenchmarkConfig(encoders={"all_mod": "x", "random": None}, tasks=["m-so2sat", "land_cover"],
                             modes=["linear_probe", "finetune"], seeds=[3, 4], data="d")
    cells = plan_cells(config)
    assert len(cells) == 2 * 2 * 2 * 2 and len({c.file_name for c in cells}) == len(cells)
    assert cells[:2] == [Cell("all_mod", "m-so2sat", "linear_probe", "default", 3),
                         Cell("all_mod", "m-so2sat", "linear_probe", "default", 4)]
    assert cells[0].file_name == "all_mod__m-so2sat__linear_probe__default__seed-3.json"
    assert cell_spec(config, Cell("random", "land_cover", "finetune", "default", 3))["crop_size"] == 56
