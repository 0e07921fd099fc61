"""A training run at a glance: its train_log.jsonl as curves (PNG) and a short markdown summary.

    python report_run.py output/instantid-crossid                 # writes report.png and report.md into the run
    python report_run.py output/instantid-crossid --out reports/run1

Curves: the loss; Face Sim of the held-out persons (same person vs different persons); the copy-paste score; the
face-token spread and loss gap of the collapse probe (red line: the collapse warning). The identity curves need a
run with --validation_persons/--validation_index and --validation_steps, the probe --collapse_check_steps
(train_instantId_sdxl.sh turns both on). What the curves mean: docs/training.md. Logic: faceid/train/run_report.py.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run's --output_dir (or its train_log.jsonl)")
    p.add_argument("--out", default=None, help="folder for report.png and report.md (default: the run's)")
    return p.parse_args(argv)


def main(args):
    from faceid.train.run_report import verdict, write_report

    png, md, summary = write_report(args.run, args.out)
    print(verdict(summary))
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
