"""Tiny offline checkpoints in the same layout real users get (``python download.py --tiny DIR``).

Everything is built from configs with fixed seeds, in seconds, and is a few megabytes::

    DIR/stable-diffusion-xl-base-1.0/   SDXL diffusers folder: UNet with ``text_time`` conditioning, VAE with 8x
                                        downsampling, CLIPTextModel + CLIPTextModelWithProjection, two byte-level
                                        CLIP tokenizers, Euler scheduler
    DIR/checkpoints/ControlNetModel/    IdentityNet made from that UNet
    DIR/checkpoints/ip-adapter.bin      official layout for that UNet (Resampler 512 -> cross-attention width)
    DIR/models/antelopev2/              tiny detector + recognizer that insightface's FaceAnalysis loads
    DIR/models/clip-vit-tiny/           tiny CLIPModel + tokenizer + preprocessor config (for evaluate.py)

The real loading code is exercised on these; no weights are ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from faceid.files import apply_umask

BASE_DIRNAME = "stable-diffusion-xl-base-1.0"
CONTROLNET_SUBDIR = "checkpoints/ControlNetModel"
ADAPTER_FILE = "checkpoints/ip-adapter.bin"
ANTELOPE_SUBDIR = "models/antelopev2"
CLIP_SUBDIR = "models/clip-vit-tiny"

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WORLD_PARTS = ("vae", "unet")
TEXT_HIDDEN = 32  # each text encoder; UNet cross-attention width = 2 * TEXT_HIDDEN
TIME_EMBED = 8
ZERO_CONV_STD = 0.005  # the tiny IdentityNet's zero-convs (see _randomise_zero_convs)
QUIET_TOKENS = 0.1  # the untrained tiny Resampler's output scale (see build_tiny_adapter)
TINY_RESAMPLER = dict(dim=64, depth=1, dim_head=64, heads=1, num_queries=4, embedding_dim=512, ff_mult=2)

# The real SDXL-base UNet configuration (for shape checks on the meta device; no weights).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def tiny_paths(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    return {
        "root": root,
        "base_model": root / BASE_DIRNAME,
        "controlnet": root / CONTROLNET_SUBDIR,
        "face_adapter": root / ADAPTER_FILE,
        "antelopev2": root / ANTELOPE_SUBDIR,
        "clip": root / CLIP_SUBDIR,
        "face_root": root,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte ↔ printable-unicode table (written here, no download)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = "<|endoftext|>") -> Path:
    """A byte-level CLIP tokenizer (no merges): vocab = 256 bytes, 256 end-of-word bytes, BOS, EOS."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = out_dir / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(raw / "vocab.json"), str(raw / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    tok.save_pretrained(out_dir)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return out_dir


def _randomise_zero_convs(controlnet, seed: int) -> None:
    """ControlNet zero-convs start at zero; give the tiny IdentityNet small random outputs so it has an effect.
    Small: at 0.05 its face-token-dependent residuals raised the frozen UNet's loss by a third, and adapter
    training then learned to make the face tokens constant (docs/miniature.md)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                p.copy_(torch.randn(p.shape, generator=g) * ZERO_CONV_STD)
            elif "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def load_world_weights(pipe, weights_dir: str | os.PathLike, parts=WORLD_PARTS) -> list[str]:
    """Load the pretrained miniature world (``faceid/tiny/world.py``; fp16 safetensors, kept fp32 here) into the
    pipeline's modules; set the VAE's measured ``scaling_factor``. Returns the parts loaded."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    loaded = []
    for name in parts:
        f = weights_dir / f"{name}.safetensors"
        if not f.is_file():
            continue
        module = getattr(pipe, name)
        sd = {k: v.float() for k, v in load_file(str(f)).items()}
        module.load_state_dict(sd, strict=True)
        loaded.append(name)
    info = weights_dir / "world.json"
    sf = json.loads(info.read_text()).get("vae", {}).get("scaling_factor") if info.is_file() else None
    if "vae" in loaded and sf:
        pipe.vae.register_to_config(scaling_factor=float(sf))
    return loaded


def build_tiny_sdxl(
    out_dir: str | os.PathLike, seed: int = 0, weights: str | os.PathLike | None = WEIGHTS_DIR
):
    """Write the tiny SDXL diffusers folder; return the pipeline components (for building the rest).

    With ``weights`` (default: the committed miniature world) the modules hold the pretrained weights; without,
    or when the files are absent, they are random (seeded)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = Path(out_dir)
    tmp_tok = out_dir.parent / f".{out_dir.name}.tokenizer"
    write_tiny_clip_tokenizer(tmp_tok)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp_tok)
    for f in tmp_tok.iterdir():
        f.unlink()
    tmp_tok.rmdir()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention at both levels (SDXL's first level has none): at 8x8 latents a face spans ~4 cells, at
        # 4x4 only ~2, too coarse for the face tokens to place an identity (SDXL attends at 64x64 and 32x32).
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_HIDDEN,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        # One group: per-channel groups would normalise away each image's absolute colours (its identity).
        norm_num_groups=1,
        mid_block_add_attention=False,
        sample_size=64,
        scaling_factor=0.13025,
    )
    eos = tokenizer.eos_token_id
    text_cfg = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=TEXT_HIDDEN,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
    )
    # positional, in StableDiffusionXLPipeline's order
    pipe = StableDiffusionXLPipeline(
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler
    )
    if weights is not None:
        load_world_weights(pipe, weights)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_identitynet(unet, out_dir: str | os.PathLike, seed: int = 0):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    _randomise_zero_convs(controlnet, seed)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return controlnet


def build_tiny_adapter(unet, path: str | os.PathLike, seed: int = 0) -> Path:
    """An untrained ``ip-adapter.bin`` in the official layout for ``unet``, initialised as IP-Adapter training
    starts: a random Resampler, IP layers copied from the UNet's ``to_k``/``to_v`` (random IP layers perturb the
    frozen UNet so much that training first learns to silence the face: docs/miniature.md)."""
    from ip_adapter.resampler import Resampler
    from ip_adapter.weights import install_ip_processors, write_adapter

    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    resampler = Resampler(output_dim=cross, **TINY_RESAMPLER)
    original = dict(unet.attn_processors)
    with (
        torch.no_grad()
    ):  # quiet face tokens: the untrained adapter barely perturbs the UNet (like zero-convs)
        resampler.norm_out.weight.mul_(QUIET_TOKENS)
        resampler.norm_out.bias.mul_(QUIET_TOKENS)
    layers = install_ip_processors(unet, num_tokens=TINY_RESAMPLER["num_queries"], init_from_unet=True)
    path = write_adapter(path, resampler, layers)
    unet.set_attn_processor(original)
    return path


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A random tiny ``CLIPModel`` folder (model, byte-level tokenizer, preprocessor config) for evaluation."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out_dir = Path(out_dir)
    write_tiny_clip_tokenizer(out_dir)
    tok = CLIPTokenizer.from_pretrained(out_dir)
    special = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        **special,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "do_convert_rgb": True,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out_dir


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, faces: bool = True) -> dict[str, Path]:
    """Build every tiny checkpoint under ``out_dir`` (idempotent: an existing complete build is reused)."""
    paths = tiny_paths(out_dir)
    marker = paths["root"] / ".tiny-complete"
    if marker.exists() and (not faces or (paths["antelopev2"] / "glintr100.onnx").exists()):
        return paths
    paths["root"].mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sdxl(paths["base_model"], seed=seed)
    build_tiny_identitynet(pipe.unet, paths["controlnet"], seed=seed + 10)
    build_tiny_adapter(pipe.unet, paths["face_adapter"], seed=seed + 20)
    build_tiny_clip(paths["clip"], seed=seed + 30)
    if faces:
        from faceid.tiny.antelope import build_tiny_antelopev2

        build_tiny_antelopev2(paths["antelopev2"])
    marker.write_text("ok\n")
    apply_umask(paths["root"])  # save_pretrained's safetensors are 0600
    return paths


def point_defaults_at_tiny(args, defaults: dict) -> dict:
    """``--tiny DIR`` of a script: build the tiny checkpoints in ``args.tiny`` and point every path attribute still
    at its default (``defaults``: attribute → default value; attributes ``base_model``, ``controlnet``,
    ``face_adapter``, ``face_root``) into it. A trained ``--face_adapter``/``--controlnet`` given explicitly is
    kept. Returns :func:`tiny_paths`."""
    paths = tiny_paths(args.tiny)
    build_tiny(args.tiny)
    for attr, default in defaults.items():
        if getattr(args, attr) == default:
            setattr(args, attr, str(paths[attr]))
    return paths
