"""Identity and copy-paste metrics from face embeddings: one definition, used by training's validation
(``faceid/train/monitor.py``) and evaluation.

For a generated image ``g`` made from a person's *reference* photo ``r``, with ``O`` the person's *other* photos and
``D`` photos of other persons (raw or normalised embeddings; every comparison is a cosine):

* ``same``      = mean cos(g, o) over o in O: the person is kept (not just the reference photo);
* ``different`` = mean cos(g, d) over d in D: the baseline a model that ignores the face also reaches;
* ``margin``    = same − different;
* ``copy``      = cos(g, r) − same: the copy-paste score. ≈ 0 when the output is as close to the reference as to
  any photo of the person; high when the reference photo is pasted (a pixel copy of r scores 1 − same(r)).
* ``ref_sim``   = cos(g, r): the classic single-reference Face Sim (evaluate.py's), kept for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEYS = ("same", "different", "margin", "copy", "ref_sim")


def normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x.reshape(-1, x.shape[-1])
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def identity_scores(generated, reference, others, different) -> dict[str, float]:
    """The scores of one generated image (see the module doc). ``others`` and ``different``: ``[N, D]``."""
    g = normalise(generated)[0]
    ref_sim = float(normalise(reference)[0] @ g)
    same = float(np.mean(normalise(others) @ g))
    diff = float(np.mean(normalise(different) @ g))
    return {
        "same": same,
        "different": diff,
        "margin": same - diff,
        "copy": ref_sim - same,
        "ref_sim": ref_sim,
    }


def mean_scores(rows: Sequence[dict]) -> dict[str, float]:
    """Means over images of :func:`identity_scores` rows (NaN for an empty list)."""
    return {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in KEYS}
