"""bench_memory's bookkeeping: chunks cover every parameter once; rows sum the measured parts; 1024 px scaling."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_chunks_cover_every_parameter_once():
    import bench_memory as bm

    shapes = [(1000, 10), (5,), (300, 300), (7, 7, 3, 3), (20000,)]
    parts = bm.chunks(shapes, size=50_000)
    assert [s for part in parts for s in part] == shapes
    assert all(sum(math.prod(s) for s in part[:-1]) < 50_000 for part in parts)


def test_rows_sum_measured_parts_and_scale_to_1024():
    import bench_memory as bm

    G = 10**9
    opt = dict(weights=4, gradients=4, autocast_copies=2, adamw_states=8, adamw8bit_states=2, params=1)
    data = {
        "resolutions": [256, 512],
        "weights": {"all": {"unet_bf16": {"rss": 5 * G}, "identitynet_bf16": {"rss": 2 * G}}},
        "optim": {
            "adapter/0": {k: v * G // 10 for k, v in opt.items()},  # a 0.1-scale adapter
            "identitynet/0": {k: v * G // 2 for k, v in opt.items()},
            "identitynet/1": {k: v * G // 2 for k, v in opt.items()},
        },
        "unet_act": {"256/0": {"activations": 1 * G}, "512/0": {"activations": 3 * G}},
        "cn_act": {
            "256/0/adapter": {"activations": 1 * G},
            "512/0/adapter": {"activations": 1 * G},
            "256/0/everything": {"activations": 1 * G},
            "512/0/everything": {"activations": 2 * G},
        },
    }
    rows, text = bm.table(data)
    # Checkpointing was not measured: only its rows are missing.
    assert [(r["train"], r["ckpt"], r["optimizer"]) for r in rows] == [
        ("adapter", False, "adamw"),
        ("adapter", False, "adamw8bit"),
        ("everything", False, "adamw"),
        ("everything", False, "adamw8bit"),
    ]
    a, e = rows[0], rows[2]
    assert (
        a["frozen_weights"] == 7 * G and e["frozen_weights"] == 5 * G
    )  # IdentityNet frozen only in "adapter"
    assert e["trained_weights"] == 4 * G + 4 * G // 10 and e["optimizer_states"] == 8 * G + 8 * G // 10
    assert rows[3]["optimizer_states"] == 2 * G + 2 * G // 10
    assert a["activations"][512] == 4 * G and a["factor"] == 2.0 and a["activations"][1024] == 8 * G
    assert e["activations"][256] == 2 * G and e["factor"] == 2.5 and e["activations"][1024] == 5 * G * 5 / 2
    fixed = 5 * G + 44 * G // 10 + 44 * G // 10 + 88 * G // 10 + 22 * G // 10
    assert e["total"][512] == fixed + 5 * G
    assert len(text.splitlines()) == 3 + len(rows)  # head, rule, rows, legend

    # A partial run (IdentityNet's 512 px phase and its optimizer chunks missing) still gives its rows, marked.
    del data["cn_act"]["512/0/everything"]
    del data["optim"]["identitynet/0"], data["optim"]["identitynet/1"]
    data["weights"]["all"]["identitynet_bf16"]["params"] = 10 * G // 10  # 10x the adapter
    rows, text = bm.table(data)
    e = rows[2]
    assert e["factor"] is None and set(e["activations"]) == {256} and set(e["total"]) == {256}
    assert e["identitynet_states_scaled"] and e["optimizer_states"] == 8 * G // 10 * 11
    assert "n/m" in text.splitlines()[4] and "*" in text.splitlines()[4]
