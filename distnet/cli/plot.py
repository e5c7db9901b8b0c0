"""Draw a run directory's figures as PNG files: training curves, staleness, bytes, compression.

Finds every metrics file under RUN_DIR (recursively: one per mode subdirectory and
per rank), compression reports, sensitivity scans and .dcz models, and writes the
figures whose data exist into RUN_DIR (or --out): loss.png and accuracy.png
(against step and wall time, a line per worker or mode), staleness.png (async,
ssp), bytes.png, latency.png, compression_layers.png, compression_stages.png,
compression_weights.png (weight histogram with the shared values) and
sensitivity.png. Needs matplotlib: pip install 'distnet[plot]'.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """\
  distnet plot runs/run-lenet300-20250101-120000-1234
  distnet plot runs/mine/async --out figures/async
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run directory (distnet run / distnet train --run-dir)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write the PNG files (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    from distnet.plots import plot_run

    written = plot_run(args.run_dir, args.out,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    for path in written:
        print(f"wrote {path}")
    return 0
