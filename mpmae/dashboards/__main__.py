"""``python -m mpmae.dashboards [OUT_DIR]``: regenerate the dashboard JSON files (default ``dashboards/``)."""

import argparse

from mpmae.dashboards.files import DEFAULT_DIR, cli_render

parser = argparse.ArgumentParser(prog="python -m mpmae.dashboards", description=__doc__)
parser.add_argument("out_dir", nargs="?", default=DEFAULT_DIR, help="folder for the JSON files")
raise SystemExit(cli_render(parser.parse_args().out_dir))
