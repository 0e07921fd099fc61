"""The index rules shared by preprocessing (``get_face_info.py``), training, mining and evaluation: which keys of a
JSONL line hold the image, caption, person, keypoints and embedding, the embedding size, and FaceID-6M's numbering.

One JSONL line must mean the same thing to every reader: each reader goes through these helpers, never its own
list of keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from faceid.files import first_value

EMBEDDING_DIM = 512  # antelopev2 / ArcFace embedding size; the Resampler's input
NUM_KPS = 5  # eyes, nose, mouth corners (insightface order)

# Spellings accepted, most specific first: our index, MFaceTech (file_name, additional_feature, landmarks,
# insightface_feature_file), the CrossFaceID / FaceID seed repos (image_file, text, kps, embedding_file / npy).
IMAGE_KEYS = ("image", "file_name", "image_file", "image_path", "path", "img")
CAPTION_KEYS = ("caption", "additional_feature", "text", "prompt", "caption_short")
PERSON_KEYS = ("person_id", "person", "identity", "identity_id", "id_name")
KPS_KEYS = ("kps", "landmarks", "keypoints")
EMBEDDING_KEYS = (
    "embedding",
    "insightface_feature_file",
    "embedding_file",
    "npy",
    "face_embedding",
    "feature_file",
)

# Written by identity mining (mine_identities.py) next to ``person_id``; ``reference`` holds fixed pairs.
PERSON_KEY = "person_id"
GIVEN_PERSON_KEY = "person_id_given"  # a label the input had, when mining replaced it
CLUSTER_SIZE_KEY = "cluster_size"  # photos in the mined person's cluster
CLUSTER_COS_KEY = "cluster_cos"  # mean pairwise cosine inside the cluster (null for a singleton)
CLUSTER_PHOTOS_KEY = "cluster_photos"  # distinct photos in the cluster (near-duplicates counted once)
REFERENCE_KEY = "reference"
FACE_IMAGE_KEY = "face_image"
BBOX_KEY = "bbox"


def image_of(record: dict):
    return first_value(record, IMAGE_KEYS)


def caption_of(record: dict) -> str:
    value = first_value(record, CAPTION_KEYS)
    return "" if value is None else value if isinstance(value, str) else str(value)


def person_of(record: dict) -> str | None:
    value = first_value(record, PERSON_KEYS)
    return None if value is None else str(value)


def kps_of(record: dict):
    return first_value(record, KPS_KEYS)


def embedding_of(record: dict):
    return first_value(record, EMBEDDING_KEYS)


def faceid6m_index_base(folder: str | os.PathLike) -> int:
    """Number of the first line's image: 0 (the datasets' README: line 0 ↔ ``0.png``) unless only ``1.png`` exists."""
    folder = Path(folder)
    return 0 if (folder / "0.png").exists() or not (folder / "1.png").exists() else 1
