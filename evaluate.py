"""Evaluate generated images: Face Sim (ArcFace cosine), CLIP-T and CLIP-I; compare result sets in one table.

    # one or several result sets (settings JSON from infer_from_pkl.py, a CSV/JSONL image,reference,prompt, or a folder)
    python evaluate.py outputs/run1/settings.json --out outputs/eval/run1
    python evaluate.py base=outputs/run1 finetuned=outputs/run2 --out outputs/eval/cmp     # + compare.md
    # re-tabulate finished evaluations (folders with summary.json) without loading models
    python evaluate.py --compare base=outputs/eval/cmp/base ft=outputs/eval/cmp/finetuned --out table.md
    # generate the protocol grid with each checkpoint, then evaluate and compare
    python evaluate.py --protocol configs/eval_protocol.json --checkpoint base=checkpoints --checkpoint ft=runs/x/ckpt \
        --faces_dir examples/eval_faces --out outputs/eval/protocol
    # editability: persons with several photos, prompts that ask for a change; identity vs copy-paste, attribute
    # following, head-angle change, checkpoints side by side (docs/evaluation.md)
    python evaluate.py --protocol configs/editability_protocol.json --persons data/index.jsonl --holdout_persons 20 \
        --holdout_seed 42 --checkpoint same=runs/same/ckpt --checkpoint cross=runs/cross/ckpt --out outputs/eval/edit

Writes per_image.csv, summary.json (mean, std, count per metric; no-face count and rate) and summary.md. Use
--face_root/--face_model_name to score Face Sim with a recognizer other than the conditioning one (antelopev2):
scoring with the model that conditioned the generation is biased upward. The logic is in faceid/eval/scoring.py,
faceid/eval/metrics.py, faceid/eval/grid.py and faceid/eval/editability.py (writes editability.csv / .json / .md /
.png).
"""

from __future__ import annotations

import argparse
import logging
import os

# Defaults (edit here).
CLIP_MODEL = "openai/clip-vit-large-patch14"  # hub id (cached) or a local CLIPModel folder
FACE_ROOT = (
    "."  # the pack is FACE_ROOT/models/FACE_MODEL_NAME (or FACE_ROOT/FACE_MODEL_NAME, or FACE_ROOT itself)
)
FACE_MODEL_NAME = "antelopev2"
DET_SIZE = 640
BATCH_SIZE = 8
DEVICE = "cpu"
OUT_DIR = "outputs/eval"


def _named(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its folder/file stem) → ordered ``{name: path}``."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or os.path.exists(v):
            path = v
            base = os.path.basename(os.path.normpath(v))
            name = os.path.splitext(base)[0] if os.path.isfile(v) else base
            if name in ("settings", "summary", "results"):
                name = os.path.basename(os.path.dirname(os.path.abspath(v)))
        if name in out:
            raise SystemExit(f"duplicate result-set name {name!r}; use NAME=PATH")
        out[name] = path
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="[NAME=]PATH of a settings JSON / CSV / JSONL / folder")
    p.add_argument("--out", default=OUT_DIR, help="output folder (with --compare: the markdown file)")
    p.add_argument(
        "--compare", action="store_true", help="inputs are finished evaluations: only tabulate them"
    )
    g = p.add_argument_group("metrics")
    g.add_argument("--clip_model", default=CLIP_MODEL)
    g.add_argument("--no_clip", action="store_true", help="skip CLIP-T/CLIP-I")
    g.add_argument("--face_root", default=FACE_ROOT)
    g.add_argument("--face_model_name", default=FACE_MODEL_NAME)
    g.add_argument("--det_size", type=int, default=DET_SIZE)
    g.add_argument("--no_face_sim", action="store_true", help="skip Face Sim")
    g.add_argument(
        "--clip_i_baseline",
        action="store_true",
        help="also CLIP-I against the same-seed generation without the face (items' 'baseline'; with --protocol "
        "these are generated with IdentityNet and adapter scales 0)",
    )
    g.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    g.add_argument("--device", default=DEVICE)
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of each set")
    g.add_argument("--no_progress", action="store_true")
    g = p.add_argument_group("protocol (generate the grid, then evaluate)")
    g.add_argument("--protocol", default=None, help="e.g. configs/eval_protocol.json")
    g.add_argument(
        "--checkpoint", action="append", default=[], help="NAME=DIR (adapter file or folder); repeatable"
    )
    g.add_argument(
        "--faces_dir", default=None, help="folder of the identities' face images (overrides the protocol)"
    )
    g.add_argument("--base_model", default=None)
    g.add_argument(
        "--controlnet", default=None, help="IdentityNet for checkpoints that have none of their own"
    )
    g.add_argument("--tiny", default=None, help="tiny offline layout folder (python download.py --tiny DIR)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--max_identities", type=int, default=None)
    g.add_argument("--max_prompts", type=int, default=None)
    g.add_argument("--max_seeds", type=int, default=None)
    g.add_argument("--generate_only", action="store_true")
    g = p.add_argument_group("editability protocol (configs/editability_protocol.json)")
    g.add_argument(
        "--persons",
        default=None,
        help="a folder with one sub-folder of photos per person, or an index with person_id (any training format)",
    )
    g.add_argument(
        "--holdout_persons",
        type=int,
        default=0,
        help="evaluate the N persons held out of the index (training's --validation_persons N picks the same)",
    )
    g.add_argument("--holdout_seed", type=int, default=0, help="the seed of that choice (training's --seed)")
    g.add_argument(
        "--data_format", default="auto", help="the --persons index format (train_instantId_sdxl.py's)"
    )
    return p.parse_args(argv)


def grid_generator():
    """``generate(argv)`` for the evaluation grid: the inference flags (``infer_from_pkl.py``'s command line) run
    in process through :mod:`faceid.generation.batch`, loading each checkpoint's pipeline once (the grid runs
    identities × seed runs × baseline per checkpoint) and freeing it for the next."""
    from faceid.generation import batch
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    parser = batch.build_parser()
    loaded = {}

    def generate(argv: list[str]) -> list[dict]:
        args = parser.parse_args(argv)
        key = batch.pipeline_key(args)
        if key not in loaded:
            loaded.clear()  # one checkpoint at a time: SDXL twice does not fit a GPU
            loaded[key] = batch.load_from_args(args, load_pipeline)
        return batch.run(args, args.prompt, lambda: loaded[key])

    return generate


def _scorers(args, evaluation):
    if not args.no_clip and not os.path.isdir(args.clip_model):
        from faceid.hub.client import preflight

        preflight(f"the CLIP model {args.clip_model} (or pass --clip_model LOCAL_DIR / --no_clip)")
    return evaluation.build_scorers(
        clip_model=None if args.no_clip else args.clip_model,
        face_root=None if args.no_face_sim else args.face_root,
        face_model_name=args.face_model_name,
        det_size=args.det_size,
        device=args.device,
        batch_size=args.batch_size,
    )


def _tiny(args):
    if not args.tiny:
        return None
    from faceid.tiny.models import build_tiny, tiny_paths

    build_tiny(args.tiny)
    return tiny_paths(args.tiny)


def main_editability(args, evaluation):
    """Generate the editability grid with each checkpoint on the persons' reference photos, then score identity,
    copy-paste, attribute following and head-angle change (faceid/eval/editability.py)."""
    from faceid.eval import editability
    from faceid.eval import grid as protocol

    proto = editability.load_protocol(args.protocol, tiny=bool(args.tiny))
    if not args.persons:
        raise SystemExit(
            "the editability protocol needs --persons: a folder with one sub-folder of photos per person, or an "
            "index with person_id (CrossFaceID, mine_identities.py's output)"
        )
    from faceid.train.records import index_persons

    persons = editability.load_persons(
        args.persons,
        args.holdout_persons,
        args.holdout_seed,
        args.max_identities,
        args.data_format,
        index_persons,
    )
    print(f"[evaluate] {len(persons)} persons, {sum(len(p.others) for p in persons)} other photos")
    grid = editability.grid_protocol(proto, persons)
    grids = protocol.generate_from_args(args, grid_generator(), tiny=_tiny(args), proto=grid)
    if args.generate_only:
        return grids
    clip, face = _load_scorers(args, evaluation)
    faces = editability.FaceCache(face.analyzer) if face is not None else None
    meta = {
        "protocol": proto.get("name"),
        "persons": os.fspath(args.persons),
        "holdout_persons": args.holdout_persons,
        "holdout_seed": args.holdout_seed,
        "clip_model": None if args.no_clip else args.clip_model,
        "face_root": None if args.no_face_sim else args.face_root,
        "face_model_name": args.face_model_name,
        "grids": grids,
    }
    summaries = editability.evaluate_grids(
        grids, persons, proto, args.out, faces, clip, args.batch_size, meta, progress=not args.no_progress
    )
    print(editability.markdown(summaries))
    return summaries


def _load_scorers(args, evaluation):
    try:
        return _scorers(args, evaluation)
    except OSError as exc:
        from faceid.hub.client import HubError

        if isinstance(exc, (FileNotFoundError, HubError)):  # their messages say what to do
            raise
        raise SystemExit(
            f"cannot load the CLIP model {args.clip_model!r} ({str(exc).splitlines()[0]}): download it once with "
            "network access, pass --clip_model LOCAL_DIR, or --no_clip to skip CLIP-T/CLIP-I"
        ) from None


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from faceid.eval import scoring as evaluation

    if args.compare:
        out = args.out if args.out.endswith(".md") else os.path.join(args.out, "compare.md")
        table = evaluation.compare_results(_named(args.inputs), out)
        print(table)
        return table

    inputs = _named(args.inputs)
    if args.protocol:
        from faceid.eval import editability
        from faceid.eval import grid as protocol

        if not os.path.isfile(args.protocol):
            raise SystemExit(f"protocol not found: {args.protocol} (e.g. configs/eval_protocol.json)")
        if editability.is_editability(args.protocol):
            return main_editability(args, evaluation)
        if args.persons or args.holdout_persons:
            raise SystemExit(
                f"--persons and --holdout_persons need an editability protocol, not {args.protocol}"
            )
        inputs.update(protocol.generate_from_args(args, grid_generator(), tiny=_tiny(args)))
        if args.generate_only:
            return inputs
    if not inputs:
        raise SystemExit("nothing to evaluate: give inputs, or --protocol with --checkpoint")
    missing = [f"{name}={path}" for name, path in inputs.items() if not os.path.exists(path)]
    if missing:  # before loading CLIP and the recognizer, which take a while
        raise SystemExit(
            f"not found: {', '.join(missing)} (give settings.json files of infer_from_pkl.py, or folders)"
        )

    clip, face = _load_scorers(args, evaluation)
    meta = {
        "clip_model": None if args.no_clip else args.clip_model,
        "face_root": None if args.no_face_sim else args.face_root,
        "face_model_name": args.face_model_name,
        "det_size": args.det_size,
        "clip_i_baseline": args.clip_i_baseline,
    }
    summaries = evaluation.evaluate_sets(
        inputs,
        args.out,
        clip,
        face,
        batch_size=args.batch_size,
        baseline=args.clip_i_baseline,
        limit=args.limit,
        progress=not args.no_progress,
        meta=meta,
    )
    print(evaluation.markdown_table(summaries))
    return summaries


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
