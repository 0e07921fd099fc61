"""Training step time on the tiny models (CPU), side by side: no cache vs the disk cache (precompute_cache.py) vs
the in-memory cache vs gradient checkpointing vs the speed options (``--compile``, ``--channels_last``, fused /
foreach AdamW), and where a step goes (data, VAE, text encoders, forward/backward,
optimizer), from ``train_log.jsonl`` with ``--log_phase_times``.

    python benchmarks/bench_train_step.py [--steps 20] [--resolution 64] [--batch_size 2] [--repeats 2] [--tiny DIR]

Runs ``train_instantId_sdxl.py`` in-process on a synthetic index (a few people, two images each) with
``--cross_id`` and reports medians over the steps after the first (the first includes warm-up); the disk cache's
one-off precompute is timed apart. The variants run in interleaved rounds (order reversed every other round) and
each is reported as the median of its per-round ratios to the uncached step of the same round, so a shared
machine's drifting load cancels. A bare MFaceTech-style loop is the reference for compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def mfacetech_style_step_ms(tiny: Path, resolution: int, batch: int, steps: int) -> float:
    """Median step time of MFaceTech's loop structure, re-written bare (no data loading, tensors prepared
    once): per step VAE encode in fp32, both text encoders, Resampler, IdentityNet fed the face tokens, UNet fed
    text + face tokens, MSE on the noise, backward, AdamW over Resampler + IP layers + IdentityNet."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ip_adapter.weights import build_resampler, install_ip_processors, load_ip_layers, read_adapter

    base = tiny / "stable-diffusion-xl-base-1.0"
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    te1 = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")
    tok1 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")
    controlnet = ControlNetModel.from_pretrained(tiny / "checkpoints" / "ControlNetModel")
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    image_proj, ip = read_adapter(tiny / "checkpoints" / "ip-adapter.bin")
    resampler = build_resampler(image_proj)
    layers = install_ip_processors(unet, num_tokens=resampler.num_queries, init_from_unet=False)
    load_ip_layers(unet, ip)
    for m in (vae, unet, te1, te2):
        m.requires_grad_(False)
    controlnet.train()  # trained modules in train mode, as every training script (and ours) does
    resampler.train()
    params = list(resampler.parameters()) + list(layers.parameters()) + list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    cond = torch.rand(batch, 3, resolution, resolution)
    emb = torch.randn(batch, 1, 512)
    ids1 = tok1(
        ["a photo of a person"] * batch, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    ids2 = tok2(
        ["a photo of a person"] * batch, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    time_ids = torch.tensor(
        [[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32
    )
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            out1 = te1(ids1, output_hidden_states=True)
            out2 = te2(ids2, output_hidden_states=True)
            text = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
            pooled = out2.text_embeds
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        face = resampler(emb)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        down, mid = controlnet(noisy, t, encoder_hidden_states=face, controlnet_cond=cond,
                               added_cond_kwargs=added, return_dict=False)  # fmt: skip
        pred = unet(noisy, t, encoder_hidden_states=torch.cat([text, face], 1), added_cond_kwargs=added,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


SPEED = {  # the step's speed options (faceid/train/speed.py), each against the plain uncached step
    "compile (inductor)": ["--compile"],
    "channels-last": ["--channels_last"],
    "fused AdamW": ["--optimizer_impl", "fused"],
    "foreach AdamW": ["--optimizer_impl", "foreach"],
    "compile+channels-last+fused": ["--compile", "--channels_last", "--optimizer_impl", "fused"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=2, help="rounds over all variants (order reversed every other)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no waits on a shared CPU)")
    p.add_argument(
        "--only", default=None, help="comma-separated variants (default: all); 'no cache' always runs"
    )
    p.add_argument("--tiny", default=None, help="tiny checkpoints folder (built in a temp dir if not given)")
    args = p.parse_args(argv)

    import logging

    import torch
    from conftest_train import make_index_dataset, tiny_args

    import precompute_cache
    import train_instantId_sdxl as train
    from faceid.tiny.models import build_tiny

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = Path(args.tiny) if args.tiny else tmp / "tiny"
        build_tiny(tiny, faces=False)
        index = make_index_dataset(tmp / "data", n_people=4, per_person=2, singles=0)
        cache = tmp / "cache"
        t0 = time.perf_counter()
        precompute_cache.main(precompute_cache.parse_args([
            "--pretrained_model_name_or_path", str(tiny / "stable-diffusion-xl-base-1.0"), "--data_json_file",
            str(index), "--resolution", str(args.resolution), "--output", str(cache), "--no_progress"]))  # fmt: skip
        pre_s = time.perf_counter() - t0
        variants = {
            "no cache": [],
            "disk cache": ["--precomputed_cache", str(cache)],
            "memory cache": ["--cache_latents", "--cache_text_embeddings"],
            "gradient checkpointing": ["--gradient_checkpointing"],
            **SPEED,
        }
        if args.only:
            keep = {"no cache", *args.only.split(",")}
            variants = {k: v for k, v in variants.items() if k in keep}
        print(f"tiny SDXL + IdentityNet + adapter, {args.resolution}px, batch {args.batch_size}, CPU, "
              f"{args.threads} thread(s); medians of {args.steps - 1} steps (the first, with any compilation, "
              f"apart), ms (share of the step); {args.repeats} interleaved rounds")  # fmt: skip
        base_ms = [mfacetech_style_step_ms(tiny, args.resolution, args.batch_size, args.steps)]
        runs = {name: [] for name in variants}  # per round: (row values, samples/s, first step s, losses)
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                out = tmp / f"{name.replace(' ', '_').replace('+', '_')}-{r}"
                argv = tiny_args(tiny, out, "--data_json_file", str(index), "--max_train_steps", str(args.steps),
                                 "--checkpointing_steps", "0", "--cross_id", "--resolution", str(args.resolution),
                                 "--train_batch_size", str(args.batch_size), "--no-log_samples",
                                 "--log_phase_times", *variants[name])  # fmt: skip
                train.main(train.parse_args(argv))
                full = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
                log = full[1:]

                def med(k, log=log):
                    return statistics.median(e[k] for e in log) * 1000

                step = med("step_time")
                parts = [
                    med(k) for k in ("data_time", "vae_time", "text_time", "fwd_bwd_time", "optimizer_time")
                ]
                vals = [step, *parts, max(0.0, step - sum(parts))]
                sps = statistics.median(e["samples_per_sec"] for e in log)
                best = min(e["step_time"] for e in log) * 1000  # the least disturbed step on a shared machine
                runs[name].append((vals, sps, full[0]["step_time"], [e["loss"] for e in full], best))
        cols = ("step", "data", "VAE", "text", "fwd/bwd", "optim", "other")
        print(f"  {'variant':28s}" + "".join(f"{c:>16s}" for c in cols)
              + f"{'samples/s':>11s}{'x no cache':>12s}{'x (best)':>10s}{'1st step s':>12s}{'max dloss':>11s}")  # fmt: skip
        plain = runs["no cache"]
        for name, rounds in runs.items():
            vals = [statistics.median(v[0][i] for v in rounds) for i in range(len(cols))]
            sps = statistics.median(v[1] for v in rounds)
            # Each round's ratio to the uncached step of the same round, then the median over rounds.
            ratio = statistics.median(v[0][0] / b[0][0] for v, b in zip(rounds, plain))
            best = statistics.median(v[4] / b[4] for v, b in zip(rounds, plain))
            first = statistics.median(v[2] for v in rounds)
            dloss = max(abs(a - b) / abs(b) for v, pv in zip(rounds, plain) for a, b in zip(v[3], pv[3]))
            step = vals[0]
            cells = [f"{step:8.1f}" + " " * 8] + [f"{v:7.1f} ({v / step:4.0%})" for v in vals[1:]]
            each = "/".join(f"{v[0][0] / b[0][0]:.2f}" for v, b in zip(rounds, plain))
            print(f"  {name:28s}" + "".join(f"{c:>16s}" for c in cells)
                  + f"{sps:11.1f}{ratio:12.2f}{best:10.2f}{first:12.1f}{dloss:11.1e}   rounds {each}")  # fmt: skip
        no_cache = [statistics.median(v[0][i] for v in plain) for i in range(2)]
        plain_compute = no_cache[0] - no_cache[1]
        n_items = 8
        if "disk cache" in runs:
            disk = statistics.median(v[0][0] / b[0][0] for v, b in zip(runs["disk cache"], plain))
            print(f"  disk cache / no cache step time: {disk:.2f}; one-off precompute of {n_items} images + "
                  f"captions: {pre_s:.1f} s incl. model load")  # fmt: skip
        base_ms.append(mfacetech_style_step_ms(tiny, args.resolution, args.batch_size, args.steps))
        base = statistics.mean(base_ms)
        print(f"  {'MFaceTech-style loop':28s} compute {base:6.1f} ms  (bare loop, no data loading; mean of a run "
              f"before and after: {base_ms[0]:.1f}, {base_ms[1]:.1f})")  # fmt: skip
        print(f"  plain compute / MFaceTech-style compute: {plain_compute / base:.2f}")
        print(
            "  x (best): the same ratio from each run's fastest step (other jobs' load only adds time); max dloss: "
            "the largest relative difference of a step's loss from the uncached step's (same seed, data, noise)"
        )


if __name__ == "__main__":
    main()
