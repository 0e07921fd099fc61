"""Measuring the papers' claims in the miniature world (``faceid/tiny/world.py``): does training teach the model to
use the face (identity), does cross-identity training reduce copy-paste (CrossFaceID), does more data help
(FaceID-6M)?

The training itself is the repository's trainer, called by ``benchmarks/bench_identity.py`` and
``tests/train/test_learns_identity.py`` as ``train_instantId_sdxl.main(parse_args(argv), hooks=...)`` (packages
never import top-level scripts); :func:`broken_trainer` gives the hooks of a deliberately broken one.

Face Sim of a generated image = cosine between the tiny recognizer's raw embeddings of the face found in it (the
world's face box → keypoints → insightface ``norm_crop``; the conditioning keypoints when no face is found) and the
reference photo's embedding, exactly as evaluate.py's Face Sim on insightface output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from faceid.tiny import world as W

GEN_STEPS = 12
GUIDANCE = 5.0
IP_SCALE = 0.8
CONTROL_SCALE = 0.8


class Recognizer:
    """The tiny antelopev2 recognizer through onnxruntime (what insightface runs)."""

    def __init__(self, antelope_dir):
        import onnxruntime

        from faceid.tiny.antelope import RECOGNIZER_FILE

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = onnxruntime.InferenceSession(
            str(Path(antelope_dir) / RECOGNIZER_FILE), opts, providers=["CPUExecutionProvider"]
        )

    def embed_crops(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {"input.1": x.astype(np.float32)})[0]

    def embed(self, images, kps_list) -> np.ndarray:
        crops = np.stack([W.aligned_crop(im, k) for im, k in zip(images, kps_list)])
        return self.embed_crops(W.crops_to_input(crops))


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# ---------------------------------------------------------------------------------------------------------------
# Datasets in get_face_info's index format


@dataclass
class WorldSet:
    root: Path
    index: Path
    photos: list
    images: np.ndarray
    embeddings: np.ndarray
    ids: list = field(default_factory=list)


def write_world_dataset(
    root, persons, per_person: int, recognizer: Recognizer, seed: int, self_reference: bool = False
) -> WorldSet:
    """``per_person`` photos of each of ``persons`` as PNGs + an index.jsonl (get_face_info format: bbox, kps,
    caption, person_id, embedding row in one shard .npy). ``self_reference``: every line's fixed ``reference`` is
    the line itself, a broken cross-identity index (``--cross_id`` then trains on the target's own embedding)."""
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "emb").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = W.person_codes()
    photos = [W.random_photo(rng, int(p)) for p in persons for _ in range(per_person)]
    images = np.stack([W.render(p, codes, seed=int(rng.integers(1 << 31))) for p in photos])
    kps = [W.box_kps(p.box) for p in photos]
    emb = recognizer.embed(images, kps).astype(np.float32)
    np.save(root / "emb" / "shard-00000.npy", emb)
    lines, ids = [], []
    for i, (p, im, k) in enumerate(zip(photos, images, kps)):
        name = f"imgs/{i:04d}.png"
        Image.fromarray(im).save(root / name)
        ids.append(f"{i:04d}")
        lines.append(json.dumps({
            "id": ids[-1], "image": name, "caption": p.caption, "width": W.IMAGE_SIZE, "height": W.IMAGE_SIZE,
            "bbox": [float(v) for v in p.box], "kps": k.tolist(), "det_score": 0.95, "num_faces": 1,
            "person_id": f"person{p.person}", "embedding": {"file": "emb/shard-00000.npy", "row": i},
            **({"reference": {"id": ids[-1]}} if self_reference else {}),
        }))  # fmt: skip
    index = root / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return WorldSet(root, index, photos, images, emb, ids)


def references(persons, recognizer: Recognizer, seed: int):
    """One fresh (held-out) reference photo per person: (photos, images, embeddings)."""
    rng = np.random.default_rng(seed)
    codes = W.person_codes()
    photos = [W.random_photo(rng, int(p)) for p in persons]
    images = np.stack([W.render(p, codes, seed=int(rng.integers(1 << 31))) for p in photos])
    return photos, images, recognizer.embed(images, [W.box_kps(p.box) for p in photos])


# ---------------------------------------------------------------------------------------------------------------
# Generation and scoring


def pipe_for(load_pipeline, paths, out=None):
    """The InstantID pipeline on the tiny base model with the start checkpoints, or those trained into ``out``.
    ``load_pipeline`` is the pipeline module's loader (passed in: packages do not import top-level scripts)."""
    cn = Path(out) / "ControlNetModel" if out else paths["controlnet"]
    ad = Path(out) / "ip-adapter.bin" if out else paths["face_adapter"]
    return load_pipeline(paths["base_model"], cn, ad, device="cpu", progress=False)


def generate(pipe, embeds, kps_list, captions, seed: int) -> np.ndarray:
    import torch

    from faceid.face.kps import draw_kps

    out = []
    for k, (e, kps, cap) in enumerate(zip(embeds, kps_list, captions)):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        img = pipe(
            cap, image_embeds=np.asarray(e, np.float32), image=draw_kps((W.IMAGE_SIZE, W.IMAGE_SIZE), kps),
            height=W.IMAGE_SIZE, width=W.IMAGE_SIZE, num_inference_steps=GEN_STEPS, guidance_scale=GUIDANCE,
            ip_adapter_scale=IP_SCALE, controlnet_conditioning_scale=CONTROL_SCALE, generator=g, output_type="np",
        ).images[0]  # fmt: skip
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


def face_embeddings(recognizer: Recognizer, images, fallback_kps):
    """Embeddings of the face found in each generated image (fallback: the conditioning keypoints)."""
    kps, found = [], []
    for im, fk in zip(images, fallback_kps):
        box = W.find_face_box(im)
        found.append(box is not None)
        kps.append(W.box_kps(box) if box is not None else fk)
    return recognizer.embed(images, kps), np.array(found)


def identity_scores(pipe, recognizer, ref_photos, ref_embeds, seed: int) -> dict:
    """Face Sim of images generated with each reference's embedding vs that person (same) and vs the next
    reference's person (different; the baseline). Prompts: the reference photo's own caption."""
    kps = [W.box_kps(p.box) for p in ref_photos]
    imgs = generate(pipe, ref_embeds, kps, [p.caption for p in ref_photos], seed)
    emb, found = face_embeddings(recognizer, imgs, kps)
    n = len(ref_photos)
    same = [cosine(emb[i], ref_embeds[i]) for i in range(n)]
    other = [cosine(emb[i], ref_embeds[(i + 1) % n]) for i in range(n)]
    return {"same": float(np.mean(same)), "different": float(np.mean(other)), "face_found": float(found.mean()),
            "images": imgs}  # fmt: skip


def other_photos(persons, per: int, recognizer: Recognizer, seed: int) -> np.ndarray:
    """Embeddings ``[len(persons), per, 512]`` of ``per`` fresh photos of each person (random attributes): the
    "other photos" the copy-paste score compares a generation with (faceid/eval/identity.py)."""
    rng = np.random.default_rng(seed)
    codes = W.person_codes()
    photos = [W.random_photo(rng, int(p)) for p in persons for _ in range(per)]
    images = np.stack([W.render(p, codes, seed=int(rng.integers(1 << 31))) for p in photos])
    return recognizer.embed(images, [W.box_kps(p.box) for p in photos]).reshape(len(persons), per, -1)


def asked_attributes(photo) -> dict:
    """What the CrossFaceID prompts ask for: the other glasses and expression than ``photo``'s, the next
    background."""
    bgs = list(W.BACKGROUNDS)
    return dict(glasses=not photo.glasses, smiling=not photo.smiling,
                background=bgs[(bgs.index(photo.background) + 1) % 3])  # fmt: skip


def attribute_scores(pipe, recognizer, ref_photos, ref_embeds, seed: int, others=None) -> dict:
    """Prompts asking for the opposite glasses/expression and another background than the reference photo's:
    how often the generated image follows the prompt vs copies the reference, per attribute (``follow`` and
    ``copy``: means over the attributes the recognizer leaks, W.LEAKED_ATTRIBUTES), and Face Sim to the
    reference. With ``others`` (:func:`other_photos` of the same persons) also the scores of
    :func:`faceid.eval.identity.identity_scores`: ``identity`` (Face Sim to the person's other photos),
    ``copy_paste`` (Face Sim to the reference minus identity) and ``margin`` (identity minus Face Sim to the other
    persons' photos)."""
    from faceid.eval.identity import identity_scores as scores
    from faceid.eval.identity import mean_scores

    kps = [W.box_kps(p.box) for p in ref_photos]
    asked = [asked_attributes(p) for p in ref_photos]
    caps = [W.caption_for(a["glasses"], a["smiling"], a["background"]) for a in asked]
    imgs = generate(pipe, ref_embeds, kps, caps, seed)
    keys = (*W.LEAKED_ATTRIBUTES, "background")
    follow, copy = {k: [] for k in keys}, {k: [] for k in keys}
    for im, a, p in zip(imgs, asked, ref_photos):
        pred = W.classify_attributes(im)
        for key in keys:
            follow[key].append(pred[key] == a[key])
            copy[key].append(pred[key] == getattr(p, key))
    emb, _ = face_embeddings(recognizer, imgs, kps)
    res = {f"follow_{k}": float(np.mean(v)) for k, v in follow.items()}
    res.update({f"copy_{k}": float(np.mean(v)) for k, v in copy.items()})
    res["follow"] = float(np.mean([res[f"follow_{k}"] for k in W.LEAKED_ATTRIBUTES]))
    res["copy"] = float(np.mean([res[f"copy_{k}"] for k in W.LEAKED_ATTRIBUTES]))
    res["face_sim"] = float(np.mean([cosine(e, r) for e, r in zip(emb, ref_embeds)]))
    if others is not None:
        n = len(ref_photos)
        rows = [scores(emb[i], ref_embeds[i], others[i], np.concatenate([others[j] for j in range(n) if j != i]))
                for i in range(n)]  # fmt: skip
        m = mean_scores(rows)
        res.update(identity=m["same"], copy_paste=m["copy"], margin=m["margin"])
    res["images"] = imgs
    return res


# The miniature run that learns identity (docs/miniature.md): the adapter only (IdentityNet stays as shipped),
# batch 8, lr 3e-3, 600 steps, --cross_id. Shared by benchmarks/bench_identity.py and its test.
LEARNING_RATE = 3e-3
BATCH = 8
IDENTITY_STEPS = 600
IDENTITY_FLAGS = ("--cross_id", "--no-train_identitynet")


def train_args(paths, data: WorldSet, out, steps: int, seed: int, *extra: str) -> list[str]:
    """The trainer's command line for a miniature run (the official-layout tiny checkpoints as the start)."""
    return [
        "--pretrained_model_name_or_path", str(paths["base_model"]),
        "--controlnet_model_name_or_path", str(paths["controlnet"]),
        "--pretrained_ip_adapter_path", str(paths["face_adapter"]),
        "--data_json_file", str(data.index), "--output_dir", str(out), "--resolution", str(W.IMAGE_SIZE),
        "--train_batch_size", str(BATCH), "--learning_rate", str(LEARNING_RATE), "--max_train_steps", str(steps),
        "--checkpointing_steps", "0", "--report_to", "none", "--seed", str(seed), "--no-log_samples",
        "--cache_text_embeddings", *extra,
    ]  # fmt: skip


BROKEN_TRAINERS = ("shuffle", "no_ip")


def _shuffle_faces(batch: dict) -> dict:
    batch["face_embeds"] = batch["face_embeds"].roll(1, dims=0)
    return batch


def _all_but_ip_layers(model) -> list:
    return [p for n, p in model.named_parameters() if p.requires_grad and "_ip." not in n]


def broken_trainer(kind: str | None):
    """The trainer's hooks (``main(args, hooks=...)``) of a deliberately broken trainer: ``shuffle`` (face
    embeddings rolled across the batch: every sample gets another's face) or ``no_ip`` (the IP layers left out of
    the optimizer); ``None``: the trainer as it is."""
    from faceid.train.config import TrainHooks

    if kind == "shuffle":
        return TrainHooks(batch=_shuffle_faces)
    if kind == "no_ip":
        return TrainHooks(trainable_parameters=_all_but_ip_layers)
    if kind is not None:
        raise ValueError(f"unknown broken trainer {kind!r} (one of {BROKEN_TRAINERS})")
    return TrainHooks()
