"""Collect pretraining / linear-probe / fine-tuning runs into one report: tables keyed by the options that differ
between runs, mean ± std over seeds, and plots. Examples:

    python report.py multirun/pretrain/2025-01-01_12-00-00
    python report.py outputs/pretrain outputs/linear_probe outputs/finetune --out reports/stems
"""

import argparse
import logging
import sys
from pathlib import Path

from sslvit.errors import ConfigError
from sslvit.paths import check_dir
from sslvit.report import make_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run dirs or sweep dirs (searched recursively for results.json)")
    parser.add_argument(
        "--out",
        default=None,
        help="where report.md, report.csv and the PNGs go (default: the path given, if one; else ./report)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if len(args.paths) == 1 and first.is_dir() else Path("report"))
    try:
        check_dir(out, "--out")  # before the runs are read: a file or a read-only place is one line
        report = make_report(args.paths, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.markdown)
    print("wrote: " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
