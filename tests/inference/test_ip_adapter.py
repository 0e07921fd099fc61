"""Resampler layout, attention processors against hand-written attention, adapter weight I/O."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
from ip_adapter.resampler import OFFICIAL_KWARGS, Resampler, resampler_kwargs_from_state
from ip_adapter.weights import (
    AdapterWeightsError,
    install_ip_processors,
    ip_layers_state,
    ip_modules,
    read_adapter,
    write_adapter,
)


def official_image_proj_state() -> dict[str, torch.Tensor]:
    """The official ip-adapter.bin ``image_proj`` key names and shapes, written out from the definition."""
    dim, inner, ff, out = 1280, 20 * 64, 1280 * 4, 2048
    shapes = {
        "latents": (1, 16, dim),
        "proj_in.weight": (dim, 512),
        "proj_in.bias": (dim,),
        "proj_out.weight": (out, dim),
        "proj_out.bias": (out,),
        "norm_out.weight": (out,),
        "norm_out.bias": (out,),
    }
    for i in range(4):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "0.norm1.weight": (dim,),
                p + "0.norm1.bias": (dim,),
                p + "0.norm2.weight": (dim,),
                p + "0.norm2.bias": (dim,),
                p + "0.to_q.weight": (inner, dim),
                p + "0.to_kv.weight": (2 * inner, dim),
                p + "0.to_out.weight": (dim, inner),
                p + "1.0.weight": (dim,),
                p + "1.0.bias": (dim,),
                p + "1.1.weight": (ff, dim),
                p + "1.3.weight": (dim, ff),
            }
        )
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_resampler_loads_official_layout_strictly():
    state = official_image_proj_state()
    assert resampler_kwargs_from_state(state) == OFFICIAL_KWARGS
    model = Resampler(**OFFICIAL_KWARGS)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.latents, state["latents"])
    out = model(torch.randn(2, 512))
    assert out.shape == (2, 16, 2048)


def test_resampler_matches_reference_computation():
    torch.manual_seed(0)
    m = Resampler(
        dim=32, depth=2, dim_head=8, heads=4, num_queries=3, embedding_dim=12, output_dim=20, ff_mult=2
    )
    x = torch.randn(2, 1, 12)
    # Reference: the perceiver attention written with einsum, heads split by hand.
    lat = m.latents.repeat(2, 1, 1)
    h = m.proj_in(x)
    for attn, ff in m.layers:
        xn, ln = attn.norm1(h), attn.norm2(lat)
        q = attn.to_q(ln)
        k, v = attn.to_kv(torch.cat([xn, ln], 1)).chunk(2, -1)
        split = lambda t: t.reshape(2, t.shape[1], 4, 8).permute(0, 2, 1, 3)  # noqa: E731
        w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", split(q), split(k)) / math.sqrt(8), -1)
        o = torch.einsum("bhqk,bhkd->bhqd", w, split(v)).permute(0, 2, 1, 3).reshape(2, 3, 32)
        lat = attn.to_out(o) + lat
        lat = ff(lat) + lat
    ref = m.norm_out(m.proj_out(lat))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def manual_attention(attn: Attention, q_in, ctx):
    b, heads = q_in.shape[0], attn.heads
    q, k, v = attn.to_q(q_in), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // heads
    sh = lambda t: t.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    w = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ sh(v)).transpose(1, 2).reshape(b, -1, heads * d)


@pytest.mark.parametrize("with_mask", [False, True])
def test_ip_processor_equals_hand_written_attention(with_mask):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    proc = IPAttnProcessor(hidden_size=16, cross_attention_dim=12, scale=0.7, num_tokens=4)
    attn.set_processor(proc)
    hidden = torch.randn(2, 6, 16)  # 6 tokens = a 2x3 grid
    text, face = torch.randn(2, 5, 12), torch.randn(2, 4, 12)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]) if with_mask else None
    out = attn(hidden, encoder_hidden_states=torch.cat([text, face], 1), region_mask=mask)

    base = manual_attention(attn, hidden, text)
    q = attn.to_q(hidden).reshape(2, 6, 2, 8).transpose(1, 2)
    k = proc.to_k_ip(face).reshape(2, 4, 2, 8).transpose(1, 2)
    v = proc.to_v_ip(face).reshape(2, 4, 2, 8).transpose(1, 2)
    face_out = (
        (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 6, 16)
    )
    if with_mask:
        face_out = face_out * mask.reshape(1, 6, 1)
    ref = attn.to_out[0](base + 0.7 * face_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_plain_processor_equals_diffusers_default():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 9, 16)
    ref = attn(x)
    attn.set_processor(AttnProcessor())
    torch.testing.assert_close(attn(x), ref)
    torch.testing.assert_close(attn(x), attn.to_out[0](manual_attention(attn, x, x)), rtol=1e-5, atol=1e-5)


def test_zero_mask_and_zero_scale_remove_face_path():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    proc = IPAttnProcessor(16, 12, scale=1.0, num_tokens=4)
    attn.set_processor(proc)
    hidden, ctx = torch.randn(1, 4, 16), torch.randn(1, 9, 12)
    text_only = attn.to_out[0](manual_attention(attn, hidden, ctx[:, :5]))
    torch.testing.assert_close(
        attn(hidden, encoder_hidden_states=ctx, region_mask=torch.zeros(8, 8)), text_only
    )
    proc.scale = 0.0
    torch.testing.assert_close(attn(hidden, encoder_hidden_states=ctx), text_only)


def test_sdxl_unet_has_140_official_ip_keys():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from faceid.tiny.models import SDXL_UNET_CONFIG

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    install_ip_processors(unet, num_tokens=16)
    state = ip_modules(unet).state_dict()
    expected = {f"{k}.to_{kv}_ip.weight" for k in range(1, 140, 2) for kv in "kv"}
    assert set(state) == expected and len(state) == 140
    # Independent hidden size per processor from its name: down_blocks.1/up_blocks.1 → 640, the rest → 1280.
    for idx, name in enumerate(unet.attn_processors):
        if idx % 2 == 0:
            assert name.endswith("attn1.processor")
            continue
        hidden = 640 if name.startswith(("down_blocks.1", "up_blocks.1")) else 1280
        for kv in "kv":
            assert tuple(state[f"{idx}.to_{kv}_ip.weight"].shape) == (hidden, 2048), name


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_adapter_round_trip_into_fresh_pipeline(tiny_paths, tmp_path, suffix):
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    pipe = load_pipeline(
        tiny_paths["base_model"], tiny_paths["controlnet"], tiny_paths["face_adapter"], progress=False
    )
    with torch.no_grad():  # make the weights differ from the file they came from
        for p in list(pipe.image_proj_model.parameters()) + list(ip_modules(pipe.unet).parameters()):
            p.add_(torch.randn_like(p))
    path = write_adapter(tmp_path / f"saved{suffix}", pipe.image_proj_model, ip_layers_state(pipe.unet))
    fresh = load_pipeline(tiny_paths["base_model"], tiny_paths["controlnet"], path, progress=False)
    for a, b in zip(
        pipe.image_proj_model.state_dict().values(), fresh.image_proj_model.state_dict().values()
    ):
        assert torch.equal(a, b)
    sa, sb = ip_layers_state(pipe.unet), ip_layers_state(fresh.unet)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    image_proj, ip = read_adapter(path)
    assert set(ip) == set(sa)


def test_flat_and_nested_forms_and_clear_errors(tmp_path, tiny_paths):
    image_proj, ip = read_adapter(tiny_paths["face_adapter"])
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {
        f"ip_adapter.{k}": v for k, v in ip.items()
    }
    torch.save(flat, tmp_path / "flat.bin")
    a, b = read_adapter(tmp_path / "flat.bin")
    assert a.keys() == image_proj.keys() and b.keys() == ip.keys()

    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    bad = dict(ip)
    bad.pop("1.to_k_ip.weight")
    bad["999.to_k_ip.weight"] = torch.zeros(1)
    bad["3.to_v_ip.weight"] = torch.zeros(3, 3)
    write_adapter(tmp_path / "bad.bin", image_proj, bad)
    with pytest.raises(AdapterWeightsError) as err:
        load_pipeline(
            tiny_paths["base_model"], tiny_paths["controlnet"], tmp_path / "bad.bin", progress=False
        )
    msg = str(err.value)
    assert "1.to_k_ip.weight" in msg and "999.to_k_ip.weight" in msg and "3.to_v_ip.weight" in msg


def test_bin_with_code_is_refused(tmp_path, evil_pickle):
    marker = evil_pickle(tmp_path / "evil.bin", "image_proj", ip_adapter={})
    with pytest.raises(AdapterWeightsError):
        read_adapter(tmp_path / "evil.bin")
    assert not marker.exists()


def test_mask_to_tokens_keeps_aspect():
    from ip_adapter.attention_processor import mask_to_tokens

    m = torch.zeros(64, 128)
    m[:, 64:] = 1
    t = mask_to_tokens(m, 8 * 16, batch=2)
    assert t.shape == (2, 128, 1)
    grid = t[0, :, 0].reshape(8, 16)
    assert grid[:, :8].sum() == 0 and grid[:, 8:].min() == 1
    assert F.interpolate(m[None, None], size=(8, 16)).sum() == grid.sum()
