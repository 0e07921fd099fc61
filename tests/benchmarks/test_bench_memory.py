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


def test_preset_rows_replace_gradients_states_and_cached_copies():
    """Optimizer in backward: gradients → the largest transient of any chunk, states → the per-parameter ones
    summed; autocast cache off: copies minus the measured on − off saving of both phases."""
    import bench_memory as bm

    G = 10**9
    opt = dict(weights=4, gradients=4, autocast_copies=2, adamw_states=8, adamw8bit_states=2, params=1)
    data = {
        "resolutions": [256, 512],
        "weights": {"all": {"unet_bf16": {"rss": 5 * G}, "identitynet_bf16": {"rss": 2 * G, "params": G}}},
        "optim": {"adapter/0": {k: v * G // 10 for k, v in opt.items()},
                  "identitynet/0": {k: v * G for k, v in opt.items()}},
        "unet_act": {f"{r}/1": {"activations": G // 10} for r in (256, 512)},
        "cn_act": {f"{r}/1/{t}": {"activations": G // 10} for r in (256, 512) for t in ("adapter", "everything")},
        "autocast": {"adapter/1": {"peak": 3 * G}, "adapter/0": {"peak": 2 * G},
                     "identitynet/1": {"peak": 5 * G}, "identitynet/0": {"peak": 1 * G}},
    }  # fmt: skip
    half = dict(
        params=G // 2, adamw_inbwd_states=4 * G, adamw_inbwd_step_peak=4 * G + 30
    )  # no 8-bit measured
    data["optim_inbwd"] = {
        "adapter/0": dict(
            params=G // 10, adamw_inbwd_states=8 * G // 10, adamw_inbwd_step_peak=8 * G // 10 + 50
        ),
        "identitynet/0": half,
    }
    assert not [r for r in bm.table(data)[0] if r.get("in_backward")]  # IdentityNet's 2nd chunk missing
    data["optim_inbwd"]["identitynet/1"] = half
    rows, text = bm.table(data)
    (r,) = [r for r in rows if r.get("in_backward")]  # AdamW, cache off (no 8-bit measured)
    assert r["optimizer"] == "adamw" and not r["autocast_cache"] and "in backward, autocast cache off" in text
    assert r["gradients"] == 50 and r["optimizer_states"] == 8 * G + 8 * G // 10
    assert r["autocast_copies"] == 2 * G + 2 * G // 10 - (1 * G + 4 * G)
    assert r["total"][512] == 5 * G + 44 * G // 10 + 50 + 88 * G // 10 + 22 * G // 10 - 5 * G + 2 * G // 10
