"""What identity monitoring costs (issue 21), measured on the miniature world with the repository's trainer.

    python benchmarks/bench_monitor.py [--steps 200] [--validation_steps 100] [--probe_steps 25] [--lr 3e-3]
                                       [--report DIR]

Two runs of the miniature identity training (faceid/tiny/claims.py: 8 persons × 4 photos, batch 8, adapter only,
--cross_id): without monitoring (the baseline) and with identity validation (8 persons, fresh photos, 12 sampling
steps, CLIP-T with the tiny CLIP) every ``--validation_steps`` and the collapse probe every ``--probe_steps``.
Printed side by side: seconds per training step, per validation and per probe, and the share of training time
monitoring takes at the intervals train_instantId_sdxl.sh uses (VALIDATION_STEPS, COLLAPSE_CHECK_STEPS).
``--report DIR`` writes the monitored run's report (report_run.py) there; ``--lr 1e-2`` makes it collapse.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faceid.tiny import claims as C  # noqa: E402

PERSONS = list(range(8))
WARMUP = 5  # first steps left out of the step time (allocation, caches)


def launcher_interval(name: str) -> int:
    """A variable's default in train_instantId_sdxl.sh (``NAME=${NAME:-value}``)."""
    text = (ROOT / "train_instantId_sdxl.sh").read_text()
    m = re.search(rf"^{name}=\$\{{{name}:-\"?(\d+)\"?\}}", text, re.M)
    if not m:
        raise SystemExit(f"train_instantId_sdxl.sh: no default for {name}")
    return int(m.group(1))


def train(argv):
    import train_instantId_sdxl as t

    return t.main(t.parse_args(argv))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def mean_of(rows, key, skip=0) -> tuple[float, int]:
    vals = [r[key] for r in rows if key in r][skip:]
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=C.LEARNING_RATE)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--probe_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", default=None, help="tiny checkpoints folder (default: built in a temp folder)")
    p.add_argument("--report", default=None, help="write the monitored run's report.png/report.md here")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from faceid.tiny.models import build_tiny
    from faceid.train.run_report import verdict, write_report

    C.LEARNING_RATE = args.lr
    v_launch, p_launch = launcher_interval("VALIDATION_STEPS"), launcher_interval("COLLAPSE_CHECK_STEPS")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = build_tiny(args.tiny or tmp / "tiny")
        rec = C.Recognizer(paths["antelopev2"])
        data = C.write_world_dataset(tmp / "data", PERSONS, 4, rec, seed=1)
        val = C.write_world_dataset(tmp / "val", PERSONS, 3, rec, seed=2)
        monitor = ["--validation_index", str(val.index), "--validation_steps", str(args.validation_steps),
                   "--validation_steps_count", str(C.GEN_STEPS), "--num_validation_faces", "0",
                   "--validation_face_model", str(paths["antelopev2"]), "--validation_clip_model", str(paths["clip"]),
                   "--collapse_check_steps", str(args.probe_steps)]  # fmt: skip
        rows = []
        for name, flags in (("baseline", []), ("monitored", monitor)):
            out = tmp / name
            t0 = time.perf_counter()
            train(C.train_args(paths, data, out, args.steps, args.seed, *C.IDENTITY_FLAGS, *flags))
            wall = time.perf_counter() - t0
            log = read_log(out)
            step, n_steps = mean_of(log, "step_time", WARMUP)
            val_s, n_val = mean_of(log, "val_seconds")
            probe_s, n_probe = mean_of(log, "probe_seconds")
            row = {"run": name, "steps": args.steps, "wall_s": round(wall, 1), "s_per_step": step,
                   "validations": n_val, "s_per_validation": val_s, "probes": n_probe, "s_per_probe": probe_s}  # fmt: skip
            if n_val or n_probe:
                spent = (val_s * n_val if n_val else 0) + (probe_s * n_probe if n_probe else 0)
                row["share_of_this_run"] = spent / (step * args.steps + spent)
                every = (val_s if n_val else 0) / v_launch + (probe_s if n_probe else 0) / p_launch
                row["share_at_launcher"] = every / (rows[0]["s_per_step"] + every)
                s = {k: v for k, v in log[-1].items() if k.startswith("val_") or k == "token_spread"}
                row.update({k: v for k, v in s.items() if k in ("val_same", "val_different", "val_copy")})
                if args.report:
                    png, md, summary = write_report(out, args.report)
                    print(verdict(summary), f"({png}, {md})")
            rows.append(row)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"## monitoring cost (launcher: VALIDATION_STEPS={v_launch}, COLLAPSE_CHECK_STEPS={p_launch})")
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")
    base, mon = rows
    print(f"step time with/without monitoring: {mon['s_per_step']:.4f} / {base['s_per_step']:.4f} s; "
          f"monitoring at the launcher's intervals: {100 * mon['share_at_launcher']:.2f} % of training time")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
