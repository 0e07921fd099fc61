"""Evaluation: Face Sim, CLIP-T, CLIP-I with tiny models built from configs; summaries match the per-image CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
from faceid.eval import metrics
from faceid.eval import scoring as ev
from faceid.tiny.models import build_tiny_clip

# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip_scorer(tiny_clip):
    return metrics.ClipScorer(str(tiny_clip), batch_size=3)


def _img(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


class StubFace:
    def __init__(self, emb):
        self.embedding = np.asarray(emb, np.float32) * 3.0  # raw, not normalised
        self.normed_embedding = self.embedding / np.linalg.norm(self.embedding)
        self.num_faces = 1


class StubAnalyzer:
    """'Detects' a face unless the image is dark; the embedding is a fixed projection of the pixels."""

    def __init__(self):
        self.proj = np.random.default_rng(0).standard_normal((8 * 8 * 3, 512))
        self.calls = 0

    def analyze(self, image):
        self.calls += 1
        arr = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), np.float64)
        if arr.mean() < 20:
            return None
        return StubFace((arr.ravel() - 128) @ self.proj)


def _write_set(root: Path, n_faces: int = 3, n_dark: int = 1) -> tuple[Path, list[Path]]:
    """A settings JSON like infer_from_pkl.py writes: outputs beside it, relative paths, shared reference."""
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "ref.png"
    _img(100).save(ref)
    images = []
    entries = []
    for i in range(n_faces + n_dark):
        p = root / f"out_{i:03d}.png"
        (Image.new("RGB", (40, 48)) if i >= n_faces else _img(i)).save(p)
        images.append(p)
        entries.append({"path": p.name, "prompt": f"a photo of person {i}", "seed": i, "face_info": None})
    entries.append({"path": "ref.png", "prompt": "a photo of the reference", "seed": 9})
    settings = {"face_image": "ref.png", "steps": 2, "images": entries}
    (root / "settings.json").write_text(json.dumps(settings))
    return root / "settings.json", images


# --------------------------------------------------------------------------------------------------- inputs


def test_load_items_settings_json_resolves_relative_and_defaults(tmp_path):
    settings, images = _write_set(tmp_path / "set")
    items = ev.load_items(settings)
    assert [it.image for it in items[:-1]] == [str(p) for p in images]
    assert all(it.reference == str(tmp_path / "set" / "ref.png") for it in items)
    assert items[0].prompt == "a photo of person 0" and items[0].seed == 0
    assert ev.load_items(tmp_path / "set")[0].image == items[0].image  # a folder works too


def test_load_items_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text("image,reference,prompt\nx.png,/abs/r.png,hello\n")
    (tmp_path / "b.jsonl").write_text(
        '{"image": "sub/y.png", "reference": "r.png", "prompt": "hi", "group": "g"}\n'
    )
    (a,) = ev.load_items(tmp_path / "a.csv")
    assert (a.image, a.reference, a.prompt) == (str(tmp_path / "x.png"), "/abs/r.png", "hello")
    (b,) = ev.load_items(tmp_path / "b.jsonl")
    assert b.image == str(tmp_path / "sub" / "y.png") and b.group == "g"


# --------------------------------------------------------------------------------------------------- CLIP


def test_clip_preprocess_matches_clip_image_processor(tiny_clip):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(tiny_clip))
    for size in [(48, 40), (40, 71), (32, 32)]:
        im = _img(7, size)
        ours = metrics.clip_preprocess(im, 32, 32)
        ref = np.asarray(proc(images=im, return_tensors="np")["pixel_values"][0])
        assert ours.shape == ref.shape == (3, 32, 32)
        assert np.abs(ours - ref).max() < 2e-2  # equal up to uint8 rounding inside the processor


def test_clip_t_and_clip_i_match_direct_computation(tiny_clip, clip_scorer, tmp_path):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    settings, images = _write_set(tmp_path / "set", n_faces=4, n_dark=0)
    items = ev.load_items(settings)
    rows = ev.evaluate_items(items, clip=clip_scorer, face=None, batch_size=2, progress=False)

    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny_clip))
    ref_pixels = torch.from_numpy(
        metrics.clip_preprocess(Image.open(items[0].reference).convert("RGB"), 32, 32)
    )
    for it, row in zip(items, rows):
        pixels = torch.from_numpy(metrics.clip_preprocess(Image.open(it.image).convert("RGB"), 32, 32))[None]
        ids = tok([it.prompt], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
            cos_t = (out.logits_per_image / model.logit_scale.exp()).item()
            a = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            b = model.visual_projection(model.vision_model(pixel_values=ref_pixels[None]).pooler_output)[0]
            cos_i = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert row["clip_t"] == pytest.approx(100 * max(cos_t, 0.0), abs=1e-3)
        assert row["clip_i"] == pytest.approx(100 * max(cos_i, 0.0), abs=1e-3)
        # the raw cosine too, so a clamped 0 cannot hide a mismatch
        e_img = clip_scorer.image_embeds([Image.open(it.image).convert("RGB")])[0]
        e_txt = clip_scorer.text_embeds([it.prompt])[0]
        assert float(e_img @ e_txt) == pytest.approx(cos_t, abs=1e-5)
    assert rows[-1]["clip_i"] == pytest.approx(100.0, abs=1e-3)  # the reference against itself


# --------------------------------------------------------------------------------------------------- Face Sim


def test_face_sim_self_other_and_no_face_with_stub(tmp_path):
    settings, images = _write_set(tmp_path / "set", n_faces=3, n_dark=2)
    analyzer = StubAnalyzer()
    rows = ev.evaluate_items(ev.load_items(settings), face=metrics.FaceEmbedder(analyzer), progress=False)
    self_row = rows[-1]
    assert self_row["face_sim"] == pytest.approx(1.0, abs=1e-9)
    assert all(r["face_sim"] < 0.9 for r in rows[:3])
    assert [r["face_detected"] for r in rows] == [True, True, True, False, False, True]
    assert analyzer.calls == len(rows) + 1  # the shared reference is analysed once
    s = ev.summarize(rows)
    assert s["no_face"] == 2 and s["no_face_rate"] == pytest.approx(2 / 6)
    assert s["face_sim"]["count"] == 4
    assert s["face_sim_all"]["mean"] == pytest.approx(sum(r["face_sim"] or 0.0 for r in rows) / 6)


def test_face_sim_with_tiny_antelope(tmp_path):
    from faceid.tiny.antelope import build_tiny_antelopev2, draw_face

    pack = build_tiny_antelopev2(tmp_path / "models" / "antelopev2")
    face = metrics.FaceEmbedder(metrics.make_face_analyzer(str(tmp_path), "antelopev2", det_size=640))
    assert face.analyzer is not None and pack.is_dir()

    def canvas(pattern, color=(230, 220, 200), box=(40, 40, 110, 130)):
        arr = np.full((160, 160, 3), 40, np.uint8)
        if pattern is not None:
            draw_face(arr, box, color=color, pattern=pattern)
        return Image.fromarray(arr)

    a, b = canvas(1), canvas(2, color=(250, 190, 170))
    ea, _ = face.embed(a)
    eb, _ = face.embed(b)
    ea2, _ = face.embed(canvas(1))
    assert ea is not None and eb is not None
    assert metrics.cosine(ea, ea2) == pytest.approx(1.0, abs=1e-5)
    assert metrics.cosine(ea, eb) < 0.99
    assert face.embed(canvas(None))[0] is None
    # the pack folder itself is accepted as --face_root too
    same = metrics.FaceEmbedder(metrics.make_face_analyzer(str(pack), None, det_size=640))
    assert metrics.cosine(same.embed(canvas(1))[0], ea) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------- reports and CLI


def _float(v: str):
    return float(v) if v not in ("", None) else None


def test_cli_summary_equals_csv_means_and_compare(tiny_clip, tmp_path, monkeypatch):
    set_a, _ = _write_set(tmp_path / "a", n_faces=3, n_dark=1)
    set_b, _ = _write_set(tmp_path / "b", n_faces=2, n_dark=2)
    analyzer = StubAnalyzer()
    monkeypatch.setattr(metrics, "make_face_analyzer", lambda *a, **k: analyzer)
    monkeypatch.setattr(ev, "make_face_analyzer", lambda *a, **k: analyzer)
    out = tmp_path / "eval"
    args = evaluate.parse_args(
        [
            f"ckA={set_a}",
            f"ckB={set_b}",
            "--out",
            str(out),
            "--clip_model",
            str(tiny_clip),
            "--face_root",
            "stub",
            "--batch_size",
            "3",
            "--no_progress",
        ]
    )
    summaries = evaluate.main(args)
    assert set(summaries) == {"ckA", "ckB"}
    for name in ("ckA", "ckB"):
        rows = ev.read_csv(out / name / "per_image.csv")
        summary = json.loads((out / name / "summary.json").read_text())
        for m in ("face_sim", "clip_t", "clip_i"):
            vals = [_float(r[m]) for r in rows if _float(r[m]) is not None]
            assert summary[m]["count"] == len(vals)
            assert summary[m]["mean"] == pytest.approx(float(np.mean(vals)), rel=1e-12)
            assert summary[m]["std"] == pytest.approx(float(np.std(vals)), rel=1e-9, abs=1e-12)
        no_face = sum(r["face_detected"] == "False" for r in rows)
        assert summary["no_face"] == no_face and summary["images"] == len(rows)
    assert json.loads((out / "ckB" / "summary.json").read_text())["no_face"] == 2
    table = (out / "compare.md").read_text()
    assert "| ckA |" in table and "| ckB |" in table and "Face Sim" in table

    # --compare re-tabulates finished results without loading any model
    cmp_out = tmp_path / "cmp.md"
    evaluate.main(
        evaluate.parse_args(
            [
                "--compare",
                f"first={out / 'ckA'}",
                f"second={out / 'ckB' / 'summary.json'}",
                "--out",
                str(cmp_out),
            ]
        )
    )
    text = cmp_out.read_text()
    assert "| first |" in text and "| second |" in text
    mean_a = json.loads((out / "ckA" / "summary.json").read_text())["clip_t"]["mean"]
    assert f"{mean_a:.2f}" in text


def test_unreadable_output_is_an_error_not_a_no_face(tmp_path):
    settings, images = _write_set(tmp_path / "set", n_faces=2, n_dark=0)
    images[0].write_bytes(b"not a png")
    rows = ev.evaluate_items(
        ev.load_items(settings), face=metrics.FaceEmbedder(StubAnalyzer()), progress=False
    )
    assert rows[0]["error"] and rows[0]["face_detected"] is None
    s = ev.summarize(rows)
    assert s["errors"] == 1 and s["no_face"] == 0 and s["face_sim"]["count"] == 2
    assert not math.isnan(s["face_sim"]["mean"])


# --------------------------------------------------------------------------------------------------- protocol


def test_shipped_protocol_is_valid(tmp_path):
    from faceid.eval import grid as protocol

    faces = tmp_path / "faces"
    faces.mkdir()
    _img(1).save(faces / "alice.png")
    proto = protocol.load_protocol(Path(__file__).parents[2] / "configs" / "eval_protocol.json", str(faces))
    cats = {p["category"] for p in proto["prompts"]}
    assert {"expression", "angle", "adornment", "style", "scene"} <= cats
    assert all("{subject}" in p["prompt"] for p in proto["prompts"])
    assert proto["identities"][0]["id"] == "alice" and protocol.seed_runs(proto["seeds"]) == [(42, 4)]
    assert protocol.seed_runs([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 2), (10, 1)]


def test_protocol_grid_calls_infer_and_merges(tmp_path, monkeypatch):

    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("bob", "carol"):
        _img(len(name)).save(faces / f"{name}.png")
    proto_path = tmp_path / "proto.json"
    proto_path.write_text(
        json.dumps(
            {
                "identities": [
                    {"face_image": "bob.png", "subject": "a man"},
                    {"id": "carol", "face_image": "carol.png"},
                ],
                "faces_dir": "faces",
                "seeds": [5, 6, 9],
                "prompts": [{"category": "style", "prompt": "sketch of {subject}"}, "{subject} on a beach"],
                "generation": {"steps": 3, "width": 64, "height": 64},
            }
        )
    )
    ckpt = tmp_path / "ckpt"
    (ckpt / "ControlNetModel").mkdir(parents=True)
    (ckpt / "ControlNetModel" / "config.json").write_text("{}")
    (ckpt / "ip-adapter.bin").write_bytes(b"x")
    calls = []

    def fake_infer(argv):
        import infer_from_pkl

        a = infer_from_pkl.parse_args(argv)
        calls.append(a)
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        recs = []
        for i, prompt in enumerate(a.prompt):
            for n in range(a.num_images):
                _img(i * 100 + a.seed + n).save(out / f"{i:02d}_{a.seed + n}.png")
                recs.append(
                    {
                        "path": f"{i:02d}_{a.seed + n}.png",
                        "prompt": prompt,
                        "seed": a.seed + n,
                        "face_image": a.face_image,
                        "face_info": None,
                    }
                )
        return recs

    monkeypatch.setattr(evaluate, "grid_generator", lambda: fake_infer)
    args = evaluate.parse_args(
        [
            "--protocol",
            str(proto_path),
            "--checkpoint",
            f"mine={ckpt}",
            "--base_model",
            "BASE",
            "--clip_i_baseline",
            "--out",
            str(tmp_path / "o"),
            "--generate_only",
        ]
    )
    inputs = evaluate.main(args)
    main_calls = [a for a in calls if a.ip_adapter_scale != 0.0]
    base_calls = [a for a in calls if a.ip_adapter_scale == 0.0]
    assert len(main_calls) == 2 * 2  # identities x seed runs
    # fixed size: baselines shared per subject ("a man", "a person") x seed runs
    assert len(base_calls) == 2 * 2 and all(a.controlnet_conditioning_scale == 0.0 for a in base_calls)
    a0 = main_calls[0]
    assert (a0.face_adapter, a0.controlnet, a0.base_model) == (
        str(ckpt / "ip-adapter.bin"),
        str(ckpt / "ControlNetModel"),
        "BASE",
    )
    assert (
        a0.prompt == ["sketch of a man", "a man on a beach"] and a0.face_info == "none" and a0.skip_existing
    )
    assert (a0.seed, a0.num_images, a0.steps, a0.width, a0.height) == (5, 2, 3, 64, 64)
    items = ev.load_items(inputs["mine"])
    assert len(items) == 2 * 2 * 3
    assert {it.group for it in items} == {"style", None}
    assert all(Path(it.image).is_file() and Path(it.baseline).is_file() for it in items)
    assert {Path(it.reference).name for it in items} == {"bob.png", "carol.png"}
    assert items[0].id == "bob/00_5" and len({it.id for it in items}) == len(items)


def test_protocol_end_to_end_on_tiny(tiny_clip, tiny_dir, tmp_path):
    from faceid.tiny.faces import write_synthetic_face

    faces = tmp_path / "faces"
    for k, name in enumerate(("ann", "ben")):
        write_synthetic_face(faces / f"{name}.png", seed=k)
    tiny = tiny_dir  # the session's tiny checkpoints (tests/conftest.py)
    out = tmp_path / "eval"
    argv = [
        "--protocol",
        str(Path(__file__).parents[2] / "configs" / "eval_protocol.json"),
        "--tiny",
        str(tiny),
    ]
    argv += [
        "--faces_dir",
        str(faces),
        "--max_prompts",
        "2",
        "--max_seeds",
        "2",
        "--clip_i_baseline",
        "--no_progress",
    ]
    argv += ["--clip_model", str(tiny_clip), "--face_root", str(tiny), "--out", str(out)]
    summaries = evaluate.main(evaluate.parse_args(argv))
    s = summaries["tiny"]
    assert s["images"] == 2 * 2 * 2 and s["errors"] == 0
    assert s["clip_t"]["count"] == 8 and s["clip_i"]["count"] == 8 and s["clip_i_baseline"]["count"] == 8
    assert s["no_face"] + s["face_sim"]["count"] == 8
    assert set(s["groups"]) == {"expression"}
    assert (out / "per_image.csv").is_file() and (out / "summary.md").is_file()


def test_grid_loads_each_checkpoint_once(tiny_dir, tiny_paths, tmp_path, monkeypatch):
    """Two checkpoints × two identities × two seeds (+ baselines): one pipeline load per checkpoint."""
    import shutil

    from faceid.generation import batch
    from faceid.tiny.faces import write_synthetic_face

    faces = tmp_path / "faces"
    for k, name in enumerate(("ann", "ben")):
        write_synthetic_face(faces / f"{name}.png", seed=k)
    second = tmp_path / "ft" / "ip-adapter.bin"
    second.parent.mkdir()
    shutil.copy(tiny_paths["face_adapter"], second)
    loads, real_load = [], batch.load_from_args
    monkeypatch.setattr(
        batch, "load_from_args", lambda a, load: loads.append(a.face_adapter) or real_load(a, load)
    )
    argv = ["--protocol", str(Path(__file__).parents[2] / "configs" / "eval_protocol.json")]
    argv += ["--tiny", str(tiny_dir), "--faces_dir", str(faces), "--max_prompts", "1", "--max_seeds", "2"]
    argv += ["--checkpoint", f"base={tiny_paths['face_adapter']}", "--checkpoint", f"ft={second}"]
    argv += ["--clip_i_baseline", "--generate_only", "--out", str(tmp_path / "eval")]
    inputs = evaluate.main(evaluate.parse_args(argv))
    assert loads == [str(tiny_paths["face_adapter"]), str(second)]
    for name in ("base", "ft"):
        items = ev.load_items(inputs[name])
        assert len(items) == 2 * 2 and all(
            Path(it.image).is_file() and Path(it.baseline).is_file() for it in items
        )
