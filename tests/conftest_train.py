"""Shared helpers for tests/test_train_*.py: small synthetic datasets in every supported index format and the
command line of a fast run on the tiny models (tests/conftest.py's session fixture ``tiny_dir``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

KPS = [[20.0, 22.0], [42.0, 22.0], [31.0, 32.0], [22.0, 44.0], [40.0, 44.0]]
SIZES = [(64, 80), (80, 64), (72, 72), (64, 96), (96, 64), (70, 90)]


def _image(path: Path, size, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.integers(0, 255, (h, w, 3))).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_index_dataset(
    root: Path, n_people: int = 3, per_person: int = 2, singles: int = 1, refs: bool = False
):
    """get_face_info-style index: images of ``n_people`` people (``per_person`` each) plus ``singles``
    one-image people; embeddings in one shard .npy. With ``refs`` the first item gets a fixed reference."""
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    n = n_people * per_person + singles
    emb = np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32)
    (root / "emb").mkdir(exist_ok=True)
    np.save(root / "emb" / "shard-00000.npy", emb)
    lines = []
    for i in range(n):
        person = f"p{i // per_person}" if i < n_people * per_person else f"single{i}"
        size = SIZES[i % len(SIZES)]
        _image(root / "imgs" / f"{i:03d}.png", size, i)
        obj = {
            "id": f"{i:03d}",
            "image": f"imgs/{i:03d}.png",
            "caption": f"a photo of person {person}",
            "width": size[0],
            "height": size[1],
            "bbox": [15, 15, 48, 50],
            "kps": KPS,
            "det_score": 0.9,
            "num_faces": 1,
            "person_id": person,
            "embedding": {"file": "emb/shard-00000.npy", "row": i},
        }
        if refs and i == 0:
            obj["reference"] = {"id": f"{n - 1:03d}"}
        lines.append(json.dumps(obj))
    path = root / "index.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_index_with_missing_image(root: Path, missing: str = "gone.png") -> tuple[Path, int]:
    """:func:`make_index_dataset` whose second line points at an image that does not exist; → (index, lines)."""
    path = make_index_dataset(root)
    lines = path.read_text().splitlines()
    obj = json.loads(lines[1])
    obj["image"] = f"imgs/{missing}"
    lines[1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def make_mfacetech_dataset(root: Path, n: int = 4):
    import torch

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        _image(root / "images" / f"{i}.jpg", SIZES[i % len(SIZES)], 100 + i)
        emb = np.random.default_rng(i).standard_normal(512).astype(np.float32)
        torch.save(emb if i % 2 else torch.from_numpy(emb), root / "features" / f"{i}.bin")
        lines.append(
            json.dumps(
                {
                    "file_name": f"images/{i}.jpg",
                    "additional_feature": "myolv1,a man with glasses",
                    "bbox": [10, 10, 50, 50],
                    "landmarks": KPS,
                    "insightface_feature_file": f"features/{i}.bin",
                }
            )
        )
    path = root / "mt.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_seed_dataset(root: Path, n: int = 4):
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        _image(root / "img" / f"{i}.png", SIZES[i % len(SIZES)], 200 + i)
        np.save(
            root / "img" / f"{i}.npy", np.random.default_rng(50 + i).standard_normal(512).astype(np.float32)
        )
        lines.append(
            json.dumps(
                {
                    "image_file": f"img/{i}.png",
                    "text": "a woman smiling",
                    "kps": KPS,
                    "embedding_file": f"img/{i}.npy",
                    "person_id": f"q{i // 2}",
                }
            )  # fmt: skip
        )
    path = root / "seed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_faceid6m_dataset(root: Path, n: int = 4):
    root = Path(root)
    (root / "face").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        _image(root / f"{i}.png", SIZES[i % len(SIZES)], 300 + i)
        _image(root / "face" / f"{i}.png", (32, 32), 400 + i)
        np.save(root / f"{i}.npy", np.random.default_rng(70 + i).standard_normal(512).astype(np.float32))
        lines.append(json.dumps({"caption": "a person on a beach", "kps": KPS}))
    (root / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    """Command-line arguments for a fast run on the tiny models."""
    tiny = Path(tiny)
    return [
        "--pretrained_model_name_or_path", str(tiny / "stable-diffusion-xl-base-1.0"),
        "--controlnet_model_name_or_path", str(tiny / "checkpoints" / "ControlNetModel"),
        "--pretrained_ip_adapter_path", str(tiny / "checkpoints" / "ip-adapter.bin"),
        "--output_dir", str(out),
        "--resolution", "64",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def env_offline() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
