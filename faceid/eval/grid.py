"""Evaluation protocol: generate the identities × prompts × seeds grid with a checkpoint, ready for evaluation.

The protocol is a JSON file (``configs/eval_protocol.json``)::

    {"faces_dir": "examples/eval_faces",          # relative to the protocol file's folder, or absolute
     "identities": "*" | [{"id": "a", "face_image": "a.jpg", "face_info": null, "subject": "a woman"}, ...],
     "default_subject": "a person",
     "seeds": [42, 43, 44, 45],
     "prompts": [{"category": "expression", "prompt": "photo of {subject} laughing"}, ...],
     "negative_prompt": "...",
     "generation": {"steps": 30, "guidance_scale": 5.0, "width": 1024, "height": 1024, ...},
     "tiny_generation": {"steps": 2, "width": 64, "height": 64}}

``"identities": "*"`` takes every image in ``faces_dir`` (id = file stem); listed identities' ``face_image`` is
relative to ``faces_dir``. ``face_info`` null means the face image is analysed by infer_from_pkl.py.

For each checkpoint, :func:`generate_grid` calls ``generate(argv)`` (infer_from_pkl.py's command line; the caller
supplies the function and keeps one pipeline per checkpoint loaded) once per identity and run of consecutive seeds (all prompts in one call, ``--num_images`` = run length, ``--skip_existing`` so an
interrupted grid resumes), writing ``OUT/generations/<ckpt>/<identity>[/s<seed>]/``. It then writes
``OUT/generations/<ckpt>/settings.json``: the settings-JSON format evaluate.py reads, every image with its
``face_image``, ``prompt``, ``seed``, ``group`` (the prompt category), ``identity`` and, with baselines,
``baseline`` (same prompt and seed with IdentityNet and adapter scales 0, i.e. the base model's image).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from faceid.errors import InputError
from faceid.files import write_json_atomic

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GEN_FLAGS = {  # protocol "generation" key -> infer_from_pkl.py flag
    "steps": "--steps",
    "guidance_scale": "--guidance_scale",
    "width": "--width",
    "height": "--height",
    "ip_adapter_scale": "--ip_adapter_scale",
    "controlnet_conditioning_scale": "--controlnet_conditioning_scale",
    "scheduler": "--scheduler",
}


def load_protocol(path: str | os.PathLike, faces_dir: str | None = None) -> dict:
    """Read the protocol and resolve its identities (list of dicts with absolute ``face_image``)."""
    path = Path(path)
    proto = json.loads(path.read_text(encoding="utf-8"))
    base = path.parent
    fdir = Path(faces_dir) if faces_dir else base / proto.get("faces_dir", ".")
    subject = proto.get("default_subject", "a person")
    ids = proto.get("identities", "*")
    if ids == "*" or faces_dir and not isinstance(ids, list):
        if not fdir.is_dir():
            raise InputError(f"faces folder not found: {fdir} (one face image per identity; --faces_dir DIR)")
        files = sorted(p for p in fdir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        identities = [{"id": p.stem, "face_image": str(p.resolve())} for p in files]
    else:
        identities = []
        for ident in ids:
            ident = {"face_image": ident} if isinstance(ident, str) else dict(ident)
            img = Path(ident["face_image"])
            ident["face_image"] = str((img if img.is_absolute() else fdir / img).resolve())
            if ident.get("face_info"):
                info = Path(ident["face_info"])
                ident["face_info"] = str((info if info.is_absolute() else fdir / info).resolve())
            ident.setdefault("id", img.stem)
            identities.append(ident)
    if not identities:
        raise InputError(f"no identities: {fdir} has no images and the protocol lists none")
    for ident in identities:
        ident.setdefault("subject", subject)
        ident.setdefault("face_info", None)
    proto["identities"] = identities
    proto["prompts"] = [{"prompt": p} if isinstance(p, str) else p for p in proto["prompts"]]
    return proto


def seed_runs(seeds: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[(first, count), ...]`` (infer_from_pkl uses seed, seed+1, ...)."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return [(a, n) for a, n in runs]


def checkpoint_paths(path: str | os.PathLike, controlnet: str | None = None) -> tuple[str, str]:
    """``(face_adapter, controlnet)`` from a checkpoint: an adapter file, a training checkpoint folder
    (``ip-adapter.bin``/``.safetensors`` + ``ControlNetModel/``) or a download layout (``checkpoints/...``)."""
    p = Path(path)
    if p.is_file():
        adapter, folder = p, p.parent
    else:
        folder = next((d for d in (p, p / "checkpoints") if d.is_dir() and _adapter_in(d)), None)
        if folder is None:
            raise InputError(
                f"{p}: no ip-adapter.bin / ip-adapter.safetensors in it or in {p / 'checkpoints'}"
            )
        adapter = _adapter_in(folder)
    own = next(
        (folder / n for n in ("ControlNetModel", "controlnet") if (folder / n / "config.json").is_file()),
        None,
    )
    cn = os.fspath(own) if own else controlnet
    if not cn:
        raise InputError(f"{p}: no ControlNetModel/ next to the adapter; pass --controlnet")
    return os.fspath(adapter), cn


def _abs(folder: Path, path: str) -> str:
    p = Path(path)
    return os.fspath(p if p.is_absolute() else (folder / p).resolve())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "subject"


def _adapter_in(folder: Path) -> Path | None:
    return next(
        (folder / n for n in ("ip-adapter.bin", "ip-adapter.safetensors") if (folder / n).is_file()), None
    )


def infer_argv(
    proto: dict, ident: dict, prompts: list[str], seed: int, count: int, out_dir: Path, paths: dict
) -> list[str]:
    argv = [
        "--base_model", paths["base_model"],
        "--face_adapter", paths["face_adapter"],
        "--controlnet", paths["controlnet"],
        "--face_image", ident["face_image"],
        "--face_info", ident.get("face_info") or "none",
        "--negative_prompt", proto.get("negative_prompt", ""),
        "--num_images", str(count),
        "--seed", str(seed),
        "--output_dir", os.fspath(out_dir),
        "--skip_existing",
    ]  # fmt: skip
    if paths.get("face_root"):
        argv += ["--face_root", paths["face_root"]]
    for key, flag in GEN_FLAGS.items():
        if paths.get("generation", {}).get(key) is not None:
            argv += [flag, str(paths["generation"][key])]
    for p in prompts:
        argv += ["--prompt", p]
    return argv


def generate_grid(
    proto: dict,
    name: str,
    paths: dict,
    out_dir: str | os.PathLike,
    baseline: bool = False,
    max_identities: int | None = None,
    max_prompts: int | None = None,
    max_seeds: int | None = None,
    *,
    generate,
) -> Path:
    """Generate the grid with one checkpoint (``paths``: base_model, face_adapter, controlnet, face_root,
    generation) and write the merged settings JSON; returns its path. ``generate(argv) -> image records`` runs
    infer_from_pkl.py's command line ``argv``."""
    root = Path(out_dir) / "generations" / name
    identities = proto["identities"][:max_identities] if max_identities else proto["identities"]
    prompts = proto["prompts"][:max_prompts] if max_prompts else proto["prompts"]
    seeds = list(proto["seeds"])[:max_seeds] if max_seeds else list(proto["seeds"])
    runs = seed_runs(seeds)
    gen = paths.get("generation", {})
    fixed_size = bool(gen.get("width") and gen.get("height"))
    base_paths = dict(paths, generation=dict(gen, ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0))
    done_baselines: set[tuple[str, int]] = set()
    images = []
    for ident in identities:
        texts = [p["prompt"].replace("{subject}", ident["subject"]) for p in prompts]
        category = {t: p.get("category") for t, p in zip(texts, prompts)}
        # Scales 0 give the base model's image, which does not depend on the face when the size is fixed: shared
        # by the identities with the same subject (same prompts), else made per identity.
        owner = _slug(ident["subject"]) if fixed_size else ident["id"]
        for seed, count in runs:
            sub = root / ident["id"] / (f"s{seed}" if len(runs) > 1 else "")
            records = generate(infer_argv(proto, ident, texts, seed, count, sub, paths))
            bdir = root / "_baseline" / owner / (f"s{seed}" if len(runs) > 1 else "")
            base_records = []
            if baseline and (owner, seed) not in done_baselines:
                base_records = generate(infer_argv(proto, ident, texts, seed, count, bdir, base_paths))
                done_baselines.add((owner, seed))
            base_by_key = {(b["prompt"], b["seed"]): _abs(bdir, b["path"]) for b in base_records}
            for r in records:
                entry = {
                    "id": f"{ident['id']}/{Path(r['path']).stem}",
                    "path": _abs(sub, r["path"]),
                    "prompt": r["prompt"],
                    "seed": r["seed"],
                    "face_image": r.get("face_image") or ident["face_image"],
                    "face_info": r.get("face_info"),
                    "identity": ident["id"],
                    "group": category.get(r["prompt"]),
                }
                if baseline:
                    # the shared baselines were made by an earlier identity: same file names (prompt#, seed)
                    entry["baseline"] = base_by_key.get((r["prompt"], r["seed"])) or _abs(
                        bdir, Path(r["path"]).name
                    )
                images.append(entry)
    settings = {
        "protocol": proto.get("name"),
        "checkpoint": name,
        **{k: v for k, v in paths.items() if k != "generation"},
        "generation": gen,
        "negative_prompt": proto.get("negative_prompt"),
        "seeds": seeds,
        "images": images,
    }
    out = root / "settings.json"
    write_json_atomic(out, settings)
    return out


def generate_from_args(args, generate, tiny: dict | None = None, proto: dict | None = None) -> dict[str, str]:
    """evaluate.py ``--protocol`` glue: generate the grid for every ``--checkpoint NAME=DIR`` with
    ``generate(argv)``; returns ``{name: merged settings JSON}``. ``tiny``: the paths of a built tiny layout
    (``faceid.tiny.models.tiny_paths``, for ``--tiny``), the defaults for models and checkpoint. ``proto``: the
    protocol with its identities resolved (default: read ``args.protocol``)."""
    proto = proto or load_protocol(args.protocol, args.faces_dir)
    gen = dict(proto.get("generation", {}))
    base_model, controlnet, face_root = args.base_model, args.controlnet, None
    checkpoints = list(args.checkpoint)
    if tiny:
        tp = tiny
        base_model = base_model or os.fspath(tp["base_model"])
        controlnet = controlnet or os.fspath(tp["controlnet"])
        face_root = os.fspath(tp["face_root"])
        gen.update(proto.get("tiny_generation", {}))
        if not checkpoints:
            checkpoints = [f"tiny={tp['face_adapter']}"]
    for key in ("steps", "height", "width"):
        if getattr(args, key, None):
            gen[key] = getattr(args, key)
    if not checkpoints:
        raise InputError("--protocol needs at least one --checkpoint NAME=DIR")
    base_model = base_model or proto.get("base_model") or "stabilityai/stable-diffusion-xl-base-1.0"
    out = {}
    for spec in checkpoints:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        adapter, cn = checkpoint_paths(path, controlnet)
        paths = {"base_model": base_model, "face_adapter": adapter, "controlnet": cn, "face_root": face_root}
        paths["generation"] = gen
        out[name] = os.fspath(
            generate_grid(
                proto,
                name,
                paths,
                args.out,
                baseline=args.clip_i_baseline,
                max_identities=args.max_identities,
                max_prompts=args.max_prompts,
                max_seeds=args.max_seeds,
                generate=generate,
            )
        )
    return out
