"""The papers' claims in the miniature world, measured with the repository's trainer (CPU, a few minutes each).

    python benchmarks/bench_identity.py identity    [--steps 600] [--lr 3e-3] [--seeds 0 1 2] [--gen_steps 12]
                                                    [--ip_scale 0.8]
    python benchmarks/bench_identity.py crossfaceid [--steps 600] [--seeds 0 1 2] [--cf_trainings ...]
    python benchmarks/bench_identity.py faceid6m    [--steps 600] [--seeds 0 1 2] [--scales 1 4 16] [--eval_every N]
    python benchmarks/bench_identity.py id_loss     [--id_loss_weight 0.1]
    python benchmarks/bench_identity.py all --json docs/miniature.json --plot docs/miniature.png
    python benchmarks/bench_identity.py identity --seeds 0 --report reports   # + each run's curves (report_run.py)

* identity: Face Sim (tiny recognizer) of images generated with a held-out reference photo's embedding vs that
  person, and vs another person (baseline), with the start checkpoints ("before") and after ``--steps`` steps of
  ``train_instantId_sdxl.py --cross_id``; per seed, plus two deliberately broken trainers (face embeddings shuffled
  across the batch; the IP layers left out of the optimizer).
* crossfaceid: same-image training vs ``--cross_id`` on the same photos, per seed and mean ± sd over seeds;
  prompts asking for the other glasses / expression / background than the reference photo's: attribute following
  vs copying the reference (world classifier), the copy-paste score (Face Sim to the reference minus Face Sim to
  the person's other photos, faceid/eval/identity.py), identity (the latter) and Face Sim to the reference.
* faceid6m: Face Sim on persons never trained on after the same steps on 1x, 4x, 16x as many photos, per seed,
  and a summary per scale: the margin's mean and spread over seeds, and whether the gain over 1x is outside it.
* id_loss: the identity benchmark's working trainer with and without ``--id_loss_weight`` (issue 13), per seed.

Every run starts from ``download.py --tiny`` (built into a temp folder unless ``--tiny DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faceid.tiny import claims as C  # noqa: E402

TRAIN_PERSONS = list(range(8))
HELD_OUT = list(range(80, 88))


# --report DIR: every training run also monitors itself (issue 21: identity validation on fresh photos of persons
# 0-7, collapse probe; the training is unchanged) and its report goes to DIR/<run>/ (report_run.py).
REPORT: dict = {}


def train(argv, hooks=None):
    import train_instantId_sdxl as t

    if not REPORT:
        return t.main(t.parse_args(argv), hooks=hooks)
    out = Path(argv[argv.index("--output_dir") + 1])
    res = t.main(t.parse_args([*argv, *REPORT["flags"]]), hooks=hooks)
    from faceid.train.run_report import write_report

    write_report(out, REPORT["dir"] / out.name)
    return res


def pipe_for(paths, out=None):
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    return C.pipe_for(load_pipeline, paths, out)


def run_identity(
    paths, work: Path, steps: int, seeds, rec, variants=("ok", "shuffle", "no_ip"), extra=()
) -> list[dict]:
    data = C.write_world_dataset(work / "id_data", TRAIN_PERSONS, 4, rec, seed=1)
    ref_photos, _, ref_emb = C.references(TRAIN_PERSONS, rec, seed=2)
    base = pipe_for(paths)
    rows = []
    for seed in seeds:
        before = C.identity_scores(base, rec, ref_photos, ref_emb, seed)
        for v in variants if seed == seeds[0] else ("ok",):
            out = work / f"id_{v}_{seed}"
            t0 = time.time()
            hooks = C.broken_trainer(None if v == "ok" else v)
            train(C.train_args(paths, data, out, steps, seed, "--cross_id", *extra), hooks=hooks)
            after = C.identity_scores(pipe_for(paths, out), rec, ref_photos, ref_emb, seed)
            rows.append({"trainer": v, "seed": seed, "steps": steps, "before_same": before["same"],
                         "before_different": before["different"], "after_same": after["same"],
                         "after_different": after["different"], "face_found": after["face_found"],
                         "margin_vs_before": after["same"] - before["same"],
                         "margin_vs_different": after["same"] - after["different"],
                         "train_seconds": round(time.time() - t0, 1)})  # fmt: skip
    return rows


def run_id_loss(paths, work: Path, steps: int, seeds, rec, weight: float, extra=()) -> list[dict]:
    flags = (
        "--id_loss_weight",
        str(weight),
        "--id_loss_recognizer",
        str(paths["antelopev2"] / "glintr100.onnx"),
    )
    rows = []
    for name, more in (("without", ()), (f"--id_loss_weight {weight}", flags)):
        for r in run_identity(paths, work / f"idl_{len(more)}", steps, seeds, rec, ("ok",), (*extra, *more)):
            rows.append({"identity loss": name, **{k: v for k, v in r.items() if k != "trainer"}})
    return rows


# CrossFaceID: the trainings compared (name, trainer flags, index with every reference = the target itself).
CF_TRAININGS = {
    "same image": ((), False),
    "--cross_id": (("--cross_id",), False),
    "broken --cross_id": (
        ("--cross_id",),
        True,
    ),  # the reference is the target photo: a same-image run in disguise
}
CF_KEYS = ("follow", "copy", "copy_paste", "identity", "face_sim")


def run_crossfaceid(
    paths,
    work: Path,
    steps: int,
    seeds,
    rec,
    extra=(),
    trainings=("same image", "--cross_id"),
    start=True,
    captions="full",
) -> list[dict]:
    """Per seed: the start checkpoint and each of ``trainings`` (CF_TRAININGS) on the same 8 persons x 4 photos
    (training ``captions``: claims.CAPTIONS), scored on prompts asking for the other glasses / expression /
    background than each held-out reference's (always the full caption)."""
    data = {}
    ref_photos, _, ref_emb = C.references(TRAIN_PERSONS, rec, seed=4)
    others = C.other_photos(TRAIN_PERSONS, 4, rec, seed=8)
    rows = []
    for seed in seeds:
        runs = [("start checkpoint", None)] if start else []
        for name in trainings:
            flags, self_ref = CF_TRAININGS[name]
            if self_ref not in data:
                data[self_ref] = C.write_world_dataset(work / f"cf_data_{int(self_ref)}", TRAIN_PERSONS, 4, rec,
                                                       seed=3, self_reference=self_ref, captions=captions)  # fmt: skip
            out = work / f"cf_{name.replace('-', '').replace(' ', '_')}_{seed}"
            t0 = time.time()
            train(C.train_args(paths, data[self_ref], out, steps, seed, *flags, *extra))
            runs.append((name, (out, round(time.time() - t0, 1))))
        for name, run in runs:
            res = C.attribute_scores(pipe_for(paths, run and run[0]), rec, ref_photos, ref_emb, seed, others)
            rows.append({"training": name, "seed": seed, **_strip(res),
                         "train_seconds": run[1] if run else 0.0})  # fmt: skip
            print(
                f"crossfaceid seed {seed} {name}: " + " ".join(f"{k} {res[k]:+.3f}" for k in CF_KEYS),
                flush=True,
            )
    return rows


def crossfaceid_summary(rows: list[dict]) -> list[dict]:
    """Mean ± standard deviation (ddof 1) over seeds of each training's CF_KEYS."""
    out = []
    for name in dict.fromkeys(r["training"] for r in rows):
        sel = [r for r in rows if r["training"] == name]
        row = {"training": name, "seeds": len(sel)}
        for k in CF_KEYS:
            v = np.array([r[k] for r in sel])
            row[k] = f"{v.mean():+.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"
        out.append(row)
    return out


# FaceID-6M: persons 0..4k-1 are trained on (k = 16 at most: 0..63); 32 persons never trained on are the test set,
# so the seed spread is not dominated by which 8 faces happened to be drawn.
F6_HELD_OUT = list(range(64, 96))
F6_KEY = ("seed", "data", "steps")


def run_faceid6m(
    paths, work: Path, steps: int, seeds, rec, extra=(), scales=(1, 4, 16), eval_every=0, done=(), on_row=None
) -> list[dict]:
    """Per seed and data scale: Face Sim on held-out persons after ``steps`` steps, and with ``eval_every`` also at
    step 0 (the start checkpoint) and every ``eval_every`` steps on the way (the trainer's checkpoints; the LR is
    constant, so checkpoint N is an N-step run). Rows of ``done`` (an earlier --json) are kept and their runs
    skipped; ``on_row(rows)`` is called after each run."""
    ref_photos, _, ref_emb = C.references(F6_HELD_OUT, rec, seed=6)
    points = sorted({*range(eval_every or steps, steps, eval_every or steps), steps})
    rows = list(done)
    have = {tuple(r[k] for k in F6_KEY) for r in rows}
    for seed in seeds:
        start = [k for k in scales if (seed, f"{k}x", 0) not in have]
        if eval_every and start:  # step 0: the start checkpoint, the same for every scale
            res = C.identity_scores(pipe_for(paths), rec, ref_photos, ref_emb, seed)
            rows += [{**_f6_row(seed, k, 0, res), "train_seconds": 0.0} for k in start]
        for k in scales:
            if all((seed, f"{k}x", s) in have for s in points):
                continue
            persons = list(range(4 * k))  # 2 photos each: 8, 32, 128 photos
            data = C.write_world_dataset(work / f"f6_data_{k}", persons, 2, rec, seed=5)
            out = work / f"f6_{k}_{seed}"
            t0 = time.time()
            train(C.train_args(paths, data, out, steps, seed, "--cross_id", *extra,
                               "--checkpointing_steps", str(eval_every if len(points) > 1 else 0)))  # fmt: skip
            sec = round(time.time() - t0, 1)
            for s in points:
                if (seed, f"{k}x", s) in have:
                    continue
                res = C.identity_scores(pipe_for(paths, out if s == steps else out / f"checkpoint-{s}"),
                                        rec, ref_photos, ref_emb, seed)  # fmt: skip
                rows.append({**_f6_row(seed, k, s, res), "train_seconds": sec})
            if on_row:
                on_row(rows)
    return rows


def _f6_row(seed: int, k: int, steps: int, res: dict) -> dict:
    return {"seed": seed, "data": f"{k}x", "photos": 8 * k, "persons": 4 * k, "steps": steps,
            "held_out_same": res["same"], "held_out_different": res["different"],
            "margin": res["same"] - res["different"], "face_found": res["face_found"]}  # fmt: skip


def faceid6m_summary(rows: list[dict]) -> list[dict]:
    """Per step count and data scale: the margin's mean, std and range over seeds, and against the smallest scale:
    the mean gain ("gain"), the smallest per-seed gain (same seed), and whether the ranges are apart (every seed of this
    scale above every seed of the smallest: the trend is outside the seed spread; "-" with fewer than 2 seeds)."""
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        at = [r for r in rows if r["steps"] == steps]
        scales = sorted({r["data"] for r in at}, key=lambda d: int(d[:-1]))
        margin = {d: {r.get("seed", 0): r["margin"] for r in at if r["data"] == d} for d in scales}
        base = margin[scales[0]]
        for d in scales:
            m, rs = np.array(list(margin[d].values())), [r for r in at if r["data"] == d]
            paired = [margin[d][s] - base[s] for s in margin[d] if s in base]
            out.append({"steps": steps, "data": d, "seeds": len(m),
                        "same_mean": float(np.mean([r["held_out_same"] for r in rs])),
                        "different_mean": float(np.mean([r["held_out_different"] for r in rs])),
                        "margin_mean": float(m.mean()), "margin_std": float(m.std(ddof=1)) if len(m) > 1 else 0.0,
                        "margin_min": float(m.min()), "margin_max": float(m.max()),
                        "gain": float(m.mean() - np.mean(list(base.values()))),
                        "paired_gain_min": float(min(paired)) if paired else float("nan"),
                        "outside_spread": "-" if d == scales[0] or min(len(m), len(base)) < 2 else
                        ("yes" if m.min() > max(base.values()) else "no")})  # fmt: skip
    return out


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "images"}


def table(rows: list[dict], title: str) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    lines = [f"## {title}", "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if set(results) <= {"faceid6m", "faceid6m_summary"}:  # faceid6m alone: its panel only
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        faceid6m_panel(ax, results["faceid6m"])
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if "identity" in results:
        rows = results["identity"]
        ok = [r for r in rows if r["trainer"] == "ok"]
        labels = [f"seed {r['seed']}" for r in ok] + [
            f"broken: {r['trainer']}" for r in rows if r["trainer"] != "ok"
        ]
        sel = ok + [r for r in rows if r["trainer"] != "ok"]
        x = np.arange(len(sel))
        for off, key, lab in ((-0.3, "before_same", "before, same person"), (-0.1, "before_different", "before, different"),
                              (0.1, "after_same", "after, same person"), (0.3, "after_different", "after, different")):  # fmt: skip
            axes[0].bar(x + off, [r[key] for r in sel], 0.2, label=lab)
        axes[0].set_xticks(x, labels, rotation=20, fontsize=8)
        axes[0].set_ylabel("Face Sim (tiny recognizer)")
        axes[0].set_title(f"identity after {sel[0]['steps']} steps")
        axes[0].legend(fontsize=7)
    if "crossfaceid" in results:
        rows = results["crossfaceid"]
        names = list(dict.fromkeys(r["training"] for r in rows))
        x = np.arange(len(names))
        keys = [k for k in ("follow", "copy", "copy_paste", "identity") if k in rows[0]]
        for i, key in enumerate(keys):
            vals = [[r[key] for r in rows if r["training"] == n] for n in names]
            axes[1].bar(x + (i - (len(keys) - 1) / 2) * 0.2, [np.mean(v) for v in vals], 0.2, label=key,
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])  # fmt: skip
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set_xticks(x, names, fontsize=8)
        axes[1].set_title("CrossFaceID: prompt asks for other attributes")
        axes[1].legend(fontsize=7)
    if "faceid6m" in results:
        faceid6m_panel(axes[2], results["faceid6m"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def faceid6m_panel(ax, rows: list[dict]) -> None:
    """Mean held-out margin per data scale over seeds, min-max bars; one line per evaluated step count."""
    summ = faceid6m_summary(rows)
    all_steps = sorted({r["steps"] for r in summ})
    for i, steps in enumerate(all_steps):
        at = [r for r in summ if r["steps"] == steps]
        mean = np.array([r["margin_mean"] for r in at])
        bars = [mean - [r["margin_min"] for r in at], [r["margin_max"] for r in at] - mean]
        shift = np.exp(0.04 * (i - (len(all_steps) - 1) / 2))  # side by side on the log axis
        x = np.array([int(r["data"][:-1]) * 8 for r in at]) * shift  # photos: 8 per scale unit
        ax.errorbar(x, mean, yerr=bars, fmt="o-", capsize=3, label=f"{steps} steps",
                    alpha=1.0 if steps == all_steps[-1] else 0.45)  # fmt: skip
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training photos (same steps)")
    ax.set_ylabel("held-out margin: same − different")
    ax.set_title(f"FaceID-6M: unseen persons ({summ[-1]['seeds']} seeds, min–max)", fontsize=9)
    ax.legend(fontsize=7)


def run_faceid6m_resumable(args, paths, work, rec, extra, results) -> list[dict]:
    """faceid6m over all --seeds; --json is rewritten after each run and its earlier faceid6m runs are kept and
    not run again, so a killed benchmark resumes, and seeds run one process after another add up in one file."""
    done = []
    if args.json and Path(args.json).is_file():
        done = [r for r in json.loads(Path(args.json).read_text()).get("faceid6m", []) if "seed" in r]
        print(f"faceid6m: {len(done)} evaluations already in {args.json}", flush=True)

    def save(rows):
        results.update(faceid6m=rows, faceid6m_summary=faceid6m_summary(rows))
        if args.json:
            tmp = Path(args.json + ".partial")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(args.json)

    rows = run_faceid6m(
        paths, work, args.steps, args.seeds, rec, extra, args.scales, args.eval_every, done, save
    )
    save(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("claim", choices=["identity", "crossfaceid", "faceid6m", "id_loss", "all"])
    p.add_argument("--steps", type=int, default=C.IDENTITY_STEPS)
    p.add_argument("--lr", type=float, default=C.LEARNING_RATE)
    p.add_argument(
        "--train_identitynet", action="store_true", help="also train IdentityNet (default: adapter only)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--gen_steps", type=int, default=C.GEN_STEPS, help="sampling steps of each generation")
    p.add_argument("--ip_scale", type=float, default=C.IP_SCALE, help="ip_adapter_scale at generation")
    p.add_argument(
        "--scales", type=int, nargs="+", default=[1, 4, 16], help="faceid6m: data scales (4k persons)"
    )
    p.add_argument(
        "--eval_every", type=int, default=0, help="faceid6m: also evaluate every N steps (checkpoints)"
    )
    p.add_argument("--id_loss_weight", type=float, default=0.1, help="the id_loss claim's weight")
    p.add_argument(
        "--cf_trainings",
        nargs="+",
        default=["same image", "--cross_id"],
        choices=list(CF_TRAININGS),
        help="the crossfaceid claim's trainings (add 'broken --cross_id': every reference is the target itself)",
    )
    p.add_argument("--cf_captions", default="full", choices=C.CAPTIONS,
                   help="the crossfaceid training captions: full, or the scene only (glasses/expression unsaid)")  # fmt: skip
    p.add_argument(
        "--trainer_flags", default="", help="more flags for every training run, e.g. '--snr_gamma 5'"
    )
    p.add_argument("--tiny", default=None, help="tiny checkpoints folder (default: built in a temp folder)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument(
        "--from_json", nargs="+", default=None, help="print and plot earlier --json files (no runs)"
    )
    p.add_argument("--plot", default=None, help="write the plot PNG here")
    p.add_argument(
        "--report", default=None, help="monitor every training run; its report goes to REPORT/<run>/"
    )
    args = p.parse_args(argv)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from faceid.tiny.models import build_tiny

    if args.from_json:
        results = {}
        for f in args.from_json:
            results.update(json.loads(Path(f).read_text()))
        for claim, rows in results.items():
            print(table(rows, claim))
        if args.plot:
            plot(results, Path(args.plot))
        return results
    C.LEARNING_RATE = args.lr
    C.GEN_STEPS, C.IP_SCALE = args.gen_steps, args.ip_scale
    extra = (() if args.train_identitynet else ("--no-train_identitynet",)) + tuple(
        args.trainer_flags.split()
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = build_tiny(args.tiny or tmp / "tiny")
        rec = C.Recognizer(paths["antelopev2"])
        if args.report:
            val = C.write_world_dataset(tmp / "report_val", TRAIN_PERSONS, 3, rec, seed=2)
            REPORT.update(dir=Path(args.report), flags=[
                "--validation_index", str(val.index), "--validation_steps", str(max(1, args.steps // 3)),
                "--validation_steps_count", str(C.GEN_STEPS), "--num_validation_faces", "0",
                "--validation_face_model", str(paths["antelopev2"]), "--collapse_check_steps", "50"])  # fmt: skip
        claims = ["identity", "crossfaceid", "faceid6m"] if args.claim == "all" else [args.claim]
        for claim in claims:
            t0 = time.time()
            if claim == "identity":
                rows = run_identity(paths, tmp, args.steps, args.seeds, rec, extra=extra)
            elif claim == "crossfaceid":
                rows = run_crossfaceid(paths, tmp, args.steps, args.seeds, rec, extra, args.cf_trainings,
                                       captions=args.cf_captions)  # fmt: skip
            elif claim == "id_loss":
                rows = run_id_loss(paths, tmp, args.steps, args.seeds, rec, args.id_loss_weight, extra)
            else:
                rows = run_faceid6m_resumable(args, paths, tmp, rec, extra, results)
            results[claim] = rows
            print(table(rows, f"{claim} ({time.time() - t0:.0f} s)"), flush=True)
            if claim == "crossfaceid":
                print(table(crossfaceid_summary(rows), "crossfaceid over seeds (mean ± sd)"), flush=True)
            if claim == "faceid6m":
                print(table(results["faceid6m_summary"], "faceid6m_summary"), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    return results


if __name__ == "__main__":
    main()
