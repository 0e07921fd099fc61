"""Download everything InstantID needs, or build tiny offline stand-ins.

    python download.py                       # InstantID weights -> checkpoints/, antelopev2 -> models/antelopev2
    python download.py --sdxl                # ... and the SDXL base model -> stable-diffusion-xl-base-1.0/
    python download.py --tiny tiny           # tiny offline checkpoints in the same layout (no network)
    python download.py --dataset crossfaceid --out data/crossfaceid [--build_index]

Downloads resume where they stopped; set ``HF_ENDPOINT`` (or ``--endpoint``) to use a mirror.
"""

from __future__ import annotations

import argparse

# ---- defaults: edit these ----------------------------------------------------------------------
CHECKPOINTS_DIR = "checkpoints"
FACE_ROOT = "."  # antelopev2 goes to FACE_ROOT/models/antelopev2
SDXL_DIR = "stable-diffusion-xl-base-1.0"
INSTANTID_REPO = "InstantX/InstantID"
# ------------------------------------------------------------------------------------------------

DATASETS = ("crossfaceid", "faceid70k", "faceid6m")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", metavar="DIR", default=None, help="build tiny offline checkpoints in DIR and stop"
    )
    p.add_argument("--checkpoints_dir", default=CHECKPOINTS_DIR)
    p.add_argument("--face_root", default=FACE_ROOT, help="antelopev2 goes to FACE_ROOT/models/antelopev2")
    p.add_argument("--instantid_repo", default=INSTANTID_REPO)
    p.add_argument("--antelope_repo", default=None, help="Hub repo holding the antelopev2 .onnx files")
    p.add_argument("--no_faces", action="store_true", help="skip antelopev2")
    p.add_argument("--sdxl", action="store_true", help="also fetch the SDXL base model")
    p.add_argument("--sdxl_dir", default=SDXL_DIR)
    p.add_argument("--dataset", choices=DATASETS, default=None, help="fetch a dataset instead of the models")
    p.add_argument("--out", default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--dataset_repo", default=None, help="override the dataset's Hub repo id")
    p.add_argument("--no_extract", action="store_true")
    p.add_argument("--delete_parts", action="store_true", help="delete each archive part once extracted")
    p.add_argument("--build_index", action="store_true", help="run get_face_info.py on the extracted dataset")
    p.add_argument("--endpoint", default=None, help="Hub URL, e.g. a mirror (default: $HF_ENDPOINT)")
    return p.parse_args(argv)


def _index_builder():
    """get_face_info.py's dataset mode on the downloaded dataset, run as its own process (scripts never import
    each other); a failure names the command, which resumes where it stopped when run again."""
    import subprocess
    import sys
    from pathlib import Path

    from faceid.errors import InputError

    script = Path(__file__).resolve().parent / "get_face_info.py"

    def build(argv: list[str]) -> None:
        code = subprocess.run([sys.executable, str(script), *argv]).returncode
        if code:
            raise InputError(f"building the index failed (exit {code}); resume it with: python {script.name} "
                             + " ".join(argv))  # fmt: skip

    return build


def main(args):
    if args.tiny:
        from faceid.tiny.models import build_tiny

        paths = build_tiny(args.tiny)
        for key in ("base_model", "controlnet", "face_adapter", "antelopev2"):
            print(f"{key:>13}: {paths[key]}")
        print(f"offline run: python infer_from_pkl.py --tiny {args.tiny}")
        return paths
    if args.dataset:
        from faceid.hub.datasets import download_dataset

        out = download_dataset(
            args.dataset,
            args.out or f"data/{args.dataset}",
            repo_id=args.dataset_repo,
            endpoint=args.endpoint,
            extract=not args.no_extract,
            build_index=_index_builder() if args.build_index else None,
            delete_parts=args.delete_parts,
        )
        print(f"dataset ready in {out}")
        return {"dataset": out}

    from faceid.hub.models import download_instantid, download_sdxl

    paths = download_instantid(args.checkpoints_dir, repo_id=args.instantid_repo, endpoint=args.endpoint)
    if not args.no_faces:
        from faceid.hub.antelope import download_antelopev2

        kwargs = {"repo_id": args.antelope_repo} if args.antelope_repo else {}
        paths["antelopev2"] = download_antelopev2(args.face_root, endpoint=args.endpoint, **kwargs)
    if args.sdxl:
        paths["base_model"] = download_sdxl(args.sdxl_dir, endpoint=args.endpoint)
    for key, value in paths.items():
        print(f"{key:>13}: {value}")
    return paths


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
