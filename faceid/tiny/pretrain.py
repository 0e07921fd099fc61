"""Pretraining the miniature world's models (``faceid/tiny/world.py``): the tiny face recognizer (CosFace over the
world's persons), the VAE (constructed, then tuned) and the SDXL UNet (+ text encoders), and the measurements of an
assembled world.

    WORLD_THREADS=2 nice python -m faceid.tiny.world --out faceid/tiny/weights   # ~14 min on 2 idle CPU cores
    python -m faceid.tiny.world --measure [DIR]   # (python -m faceid.tiny.pretrain is the same command)

writes ``vae/unet/recognizer.safetensors`` (fp16) and ``world.json``; ``faceid.tiny.models.build_tiny`` assembles
the usual layout from them. Deterministic for a given torch version and thread count (seeds fixed; CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from faceid.files import apply_umask
from faceid.tiny.world import (
    BACKGROUNDS,
    IMAGE_SIZE,
    LEAK,
    LEAKED_ATTRIBUTES,
    NUM_PERSONS,
    REC_CHANNELS,
    WEIGHTS_DIR,
    WORLD_SEED,
    base_model_following,
    box_kps,
    caption_for,
    crops_to_input,
    decoded_like,
    fast_crop,
    find_face_box,
    latent_std,
    leak_directions,
    measure_recognizer,
    person_codes,
    random_photo,
    render,
    sample_photos,
    to_pixels,
    vae_reconstruction,
)

# ---------------------------------------------------------------------------------------------------------------
# Recognizer (torch for training; exported to ONNX by faceid.tiny.antelope with the same ops)


def recognizer_torch():
    import torch
    from torch import nn

    torch.manual_seed(0)  # before the layers: they draw their initial weights when made
    layers, cin = [], 3
    for c in REC_CHANNELS:
        layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.ReLU()]
        cin = c
    layers += [nn.Flatten(), nn.Linear(cin * 4 * 4, 512)]
    return nn.Sequential(*layers)


def recognizer_arrays(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    convs = [k[: -len(".weight")] for k in sd if k.endswith(".weight") and sd[k].ndim == 4]
    lin = [k[: -len(".weight")] for k in sd if k.endswith(".weight") and sd[k].ndim == 2][0]
    out = {}
    for i, k in enumerate(convs):
        out[f"conv{i}.weight"], out[f"conv{i}.bias"] = sd[k + ".weight"], sd[k + ".bias"]
    out["fc.weight"], out["fc.bias"] = sd[lin + ".weight"], sd[lin + ".bias"]
    return out


def _recognizer_batch(rng, n, persons, codes, blur: bool = True, decoded: float = 0.5):
    """Aligned crops (with photo-level and generation-like perturbations), person labels and attribute labels
    ``[n, len(LEAKED_ATTRIBUTES)]``. A share ``decoded``
    of the photos is seen as the VAE paints it (with per-cell noise), aligned on the face box found in it, as
    Face Sim reads a generated image: identity must survive what the world's models can draw."""
    import cv2

    crops, labels, attrs = [], [], []
    for _ in range(n):
        p = int(rng.choice(persons))
        photo = random_photo(rng, p)
        attrs.append([getattr(photo, a) for a in LEAKED_ATTRIBUTES])
        img = render(photo, codes, seed=int(rng.integers(1 << 31))).astype(np.float32)
        box = photo.box
        if rng.random() < decoded:
            img = np.clip(decoded_like(img, rng, rng.uniform(0, 24)), 0, 255)
            box = find_face_box(img) or box
        elif blur and rng.random() < 0.7:
            s = rng.uniform(0.3, 1.4)
            img = cv2.GaussianBlur(img, (0, 0), s)
        img = img + rng.normal(0, rng.uniform(0, 10), img.shape) + rng.uniform(-10, 10, (1, 1, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        kps = box_kps(box) + rng.normal(0, 0.6, (5, 2)).astype(np.float32)
        crops.append(fast_crop(img, kps))
        labels.append(p)
    return crops_to_input(np.stack(crops)), np.array(labels), np.array(attrs, np.float32)


def train_recognizer(steps: int = 300, batch: int = 48, leak_weight: float = 20.0, log=print):
    """CosFace-trained tiny recognizer over the world's persons (like ArcFace over people), whose normalised
    embedding also leaks the photo's attributes (world.LEAK along world.leak_directions(), an L2 loss of weight
    ``leak_weight``), as ArcFace's leaks expression and adornments."""
    import torch
    import torch.nn.functional as F

    codes = person_codes()
    model = recognizer_torch()
    torch.manual_seed(1)
    classes = torch.nn.Parameter(torch.randn(NUM_PERSONS, 512) * 0.01)
    opt = torch.optim.Adam(list(model.parameters()) + [classes], lr=2e-3)
    rng = np.random.default_rng(WORLD_SEED + 1)
    persons = list(range(NUM_PERSONS))
    scale, margin = 16.0, 0.2
    dirs = torch.from_numpy(leak_directions())
    for step in range(steps):
        x, y, a = _recognizer_batch(rng, batch, persons, codes)
        emb = F.normalize(model(torch.from_numpy(x)), dim=1)
        cos = emb @ F.normalize(classes, dim=1).T
        y = torch.from_numpy(y)
        logits = scale * (cos - margin * F.one_hot(y, NUM_PERSONS))
        leak = F.mse_loss(emb @ dirs.T, LEAK * (2 * torch.from_numpy(a) - 1))
        loss = F.cross_entropy(logits, y) + leak_weight * leak
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"recognizer {step:5d} loss {loss.item():.3f} leak {leak.item():.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# VAE and UNet pretraining


def construct_vae(vae, const: float = 50.0, shift: float = 10.0) -> None:
    """Set ``vae`` (AutoencoderKL, one norm group, no mid attention) to an exact colour autoencoder: the latents'
    first three channels are the RGB means of 8x8 cells, the decoder paints them back (nearest).

    Every ResNet branch is zeroed (blocks = identity or channel copy), downsamplers average 2x2, upsamplers copy.
    The only remaining non-linear steps are the two output GroupNorm + SiLU: a large constant channel plus
    negated copies of the colours make the group's mean and variance image-independent (so the norm is a fixed
    affine map), and a shift keeps SiLU in its linear range. Gradient descent refines this start
    (:func:`train_vae`): a random start does not learn colours in a CPU budget."""
    import torch

    def copy_conv(conv, pairs, center=True):
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
        k = conv.weight.shape[-1]
        for o, i, w in pairs:
            if center:
                conv.weight[o, i, k // 2, k // 2] = w
            else:
                conv.weight[o, i, :2, :2] = w / 4.0

    def carry(n):  # channels 0-2 colour, 3-5 negated colour, 6 constant
        return [(c, c, 1.0) for c in range(n)]

    def norm_out(norm, conv_out, out_pairs, bias_out):
        c = norm.num_channels
        sigma = const * math.sqrt(c - 1) / c
        norm.weight.fill_(sigma)
        norm.bias.fill_(const / c + shift)
        copy_conv(conv_out, out_pairs)
        conv_out.bias.copy_(torch.as_tensor(bias_out, dtype=conv_out.bias.dtype))

    def identity_resnet(r):
        r.conv2.weight.zero_()
        r.conv2.bias.zero_()
        if r.conv_shortcut is not None:
            copy_conv(r.conv_shortcut, carry(min(r.conv_shortcut.in_channels, r.conv_shortcut.out_channels)))

    with torch.no_grad():
        enc, dec = vae.encoder, vae.decoder
        copy_conv(enc.conv_in, [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)])
        enc.conv_in.bias[6] = const
        for block in enc.down_blocks:
            for r in block.resnets:
                identity_resnet(r)
            for d in block.downsamplers or []:
                copy_conv(d.conv, carry(7), center=False)
        for r in enc.mid_block.resnets:
            identity_resnet(r)
        lc = vae.config.latent_channels
        bias = [-shift] * 3 + [0.0] * (lc - 3) + [-16.0] * lc  # logvar -16: std 3e-4
        norm_out(enc.conv_norm_out, enc.conv_out, [(c, c, 1.0) for c in range(3)], bias)
        copy_conv(vae.quant_conv, [(c, c, 1.0) for c in range(2 * lc)])
        copy_conv(vae.post_quant_conv, [(c, c, 1.0) for c in range(lc)])
        copy_conv(dec.conv_in, [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)])
        dec.conv_in.bias[6] = const
        for r in dec.mid_block.resnets:
            identity_resnet(r)
        for block in dec.up_blocks:
            for r in block.resnets:
                identity_resnet(r)
            for u in block.upsamplers or []:
                copy_conv(u.conv, carry(7))
        norm_out(dec.conv_norm_out, dec.conv_out, [(c, c, 1.0) for c in range(3)], [-shift] * 3)


def train_vae(vae, steps: int = 150, batch: int = 16, crop: int = 32, lr: float = 3e-4, log=print):
    """Reconstruction (L1 + L2) with a small KL, on random ``crop``-pixel windows of photos (fully
    convolutional: the same weights then work on whole images at a quarter of the cost)."""
    import torch

    construct_vae(vae)
    if steps <= 0:
        return vae.eval()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    rng = np.random.default_rng(WORLD_SEED + 2)
    for step in range(steps):
        imgs, _ = sample_photos(batch, list(range(NUM_PERSONS)), seed=10_000 + step)
        oy, ox = (int(v) * 8 for v in rng.integers(0, (IMAGE_SIZE - crop) // 8 + 1, 2))
        x = to_pixels(np.ascontiguousarray(imgs[:, oy : oy + crop, ox : ox + crop]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + torch.nn.functional.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step:5d} loss {loss.item():.4f} kl {kl.item():.4f}")
    return vae.eval()


def encode_captions(tokenizers, encoders, captions):
    """SDXL conditioning as the trainer and the pipeline compute it (penultimate states; pooled from enc 2)."""
    import torch

    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, encoders):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        out = enc(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def all_captions() -> list[str]:
    return [caption_for(g, s, b) for g in (False, True) for s in (False, True) for b in BACKGROUNDS]


def train_unet(pipe, scaling, steps: int = 1200, batch: int = 32, pool: int = 4096, log=print):
    """Text-conditioned denoising pretraining of the UNet on latents of world photos. The text encoders stay as
    built (frozen, like SDXL's CLIPs); the world's 12 captions are encoded once."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encs = [pipe.text_encoder, pipe.text_encoder_2]
    toks = [pipe.tokenizer, pipe.tokenizer_2]
    params = list(unet.parameters())
    with torch.no_grad():
        caps = all_captions()
        cap_emb, cap_pooled = encode_captions(toks, encs, caps)
    cap_index = {c: i for i, c in enumerate(caps)}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=max(0.05, 3 / steps))
    unet.train()
    g = torch.Generator().manual_seed(3)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    ema = None
    # A pool of encoded photos (posterior mean and std), sampled anew each step.
    pool_mean, pool_std, pool_cap = [], [], []
    with torch.no_grad():
        for k in range(pool // 64):
            imgs, photos = sample_photos(64, list(range(NUM_PERSONS)), seed=50_000 + k)
            d = vae.encode(to_pixels(imgs)).latent_dist
            pool_mean.append(d.mean)
            pool_std.append(d.std)
            pool_cap += [cap_index[p.caption] for p in photos]
    pool_mean, pool_std, pool_cap = torch.cat(pool_mean), torch.cat(pool_std), torch.tensor(pool_cap)
    for step in range(steps):
        sel = torch.randint(0, len(pool_cap), (batch,), generator=g)
        lat = (pool_mean[sel] + pool_std[sel] * torch.randn(pool_mean[sel].shape, generator=g)) * scaling
        ix = pool_cap[sel]
        emb, pooled = cap_emb[ix], cap_pooled[ix]
        drop = (torch.rand(batch, generator=g) < 0.1).float()
        # force_zeros_for_empty_prompt: the pipeline's unconditional input is zeros.
        emb = emb * (1 - drop)[:, None, None]
        pooled = pooled * (1 - drop)[:, None]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)}).sample  # fmt: skip
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet {step:5d} loss {ema:.4f}")
    unet.eval()
    return unet


# ---------------------------------------------------------------------------------------------------------------
# The build script


def save_fp16(module_or_dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sd = module_or_dict if isinstance(module_or_dict, dict) else module_or_dict.state_dict()
    sd = {k: (torch.as_tensor(v).to(torch.float16) if torch.as_tensor(v).is_floating_point() else torch.as_tensor(v))
          .contiguous() for k, v in sd.items()}  # fmt: skip
    save_file(sd, str(path))
    apply_umask(path)  # safetensors writes 0600 whatever the umask


def _update_info(out: Path, key: str, value: dict) -> dict:
    path = out / "world.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update({"seed": WORLD_SEED, "image_size": IMAGE_SIZE, "num_persons": NUM_PERSONS, key: value})
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def build_world(out: Path, parts, vae_steps: int, unet_steps: int, rec_steps: int, log=print) -> dict:
    """Pretrain ``parts`` (``recognizer``, ``vae``, ``unet``; the UNet needs the VAE in ``out``) into ``out``."""
    import tempfile

    import torch

    from faceid.tiny.models import build_tiny_sdxl, load_world_weights

    out.mkdir(parents=True, exist_ok=True)
    info = {}
    if "recognizer" in parts:
        t = time.time()
        rec = train_recognizer(rec_steps, log=log)
        save_fp16(recognizer_arrays(rec), out / "recognizer.safetensors")
        info = _update_info(out, "recognizer", {"steps": rec_steps, "seconds": round(time.time() - t)})
    if "vae" not in parts and "unet" not in parts:
        return info
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sdxl(Path(tmp) / "sdxl", seed=0, weights=None)
    if "vae" in parts:
        torch.manual_seed(0)
        t = time.time()
        train_vae(pipe.vae, vae_steps, log=log)
        save_fp16(pipe.vae, out / "vae.safetensors")
        load_world_weights(pipe, out, parts=("vae",))
        scaling = 1.0 / latent_std(pipe.vae, 1.0)
        info = _update_info(out, "vae", {"steps": vae_steps, "seconds": round(time.time() - t),
                                         "scaling_factor": scaling})  # fmt: skip
    if "unet" in parts:
        load_world_weights(pipe, out, parts=("vae",))  # train on the committed (fp16-rounded) VAE
        torch.manual_seed(0)
        t = time.time()
        train_unet(pipe, pipe.vae.config.scaling_factor, unet_steps, log=log)
        save_fp16(pipe.unet, out / "unet.safetensors")
        info = _update_info(out, "unet", {"steps": unet_steps, "seconds": round(time.time() - t)})
    return info


def measure_world(root: Path, log=print) -> dict:
    """Figures of an assembled tiny world (``build_tiny(root)``): VAE, recognizer, base model."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from faceid.tiny.antelope import RECOGNIZER_FILE
    from faceid.tiny.models import tiny_paths

    paths = tiny_paths(root)
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base_model"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    sf = pipe.vae.config.scaling_factor
    res = {"scaling_factor": sf, "latent_std": latent_std(pipe.vae, sf)}
    res["vae_reconstruction"] = vae_reconstruction(pipe.vae)
    import onnxruntime

    sess = onnxruntime.InferenceSession(
        str(paths["antelopev2"] / RECOGNIZER_FILE), providers=["CPUExecutionProvider"]
    )
    res["recognizer"] = measure_recognizer(lambda x: sess.run(None, {"input.1": x})[0])
    with torch.no_grad():
        res["base_model_following"] = base_model_following(pipe)
    log(json.dumps(res, indent=2))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Pretrain the tiny world's VAE, UNet, text encoders and recognizer."
    )
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--vae_steps", type=int, default=0)
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--recognizer_steps", type=int, default=700)
    p.add_argument("--parts", default="recognizer,vae,unet", help="comma-separated subset to (re)train")
    p.add_argument("--measure", nargs="?", const="", default=None, metavar="DIR",
                   help="only measure the world assembled in DIR (download.py --tiny DIR; none: built from "
                   "faceid/tiny/weights into a temporary folder)")  # fmt: skip
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("WORLD_THREADS", "1")))
    if args.measure is not None:
        if args.measure:
            return measure_world(Path(args.measure))
        import tempfile

        from faceid.tiny.models import build_tiny

        with tempfile.TemporaryDirectory() as tmp:
            build_tiny(Path(tmp) / "tiny")
            return measure_world(Path(tmp) / "tiny")
    info = build_world(Path(args.out), args.parts.split(","), args.vae_steps, args.unet_steps,
                       args.recognizer_steps)  # fmt: skip
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
