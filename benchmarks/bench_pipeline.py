"""Seconds per denoising step and peak memory of the InstantID pipeline on the tiny weights (128x128, 10 steps,
CFG on), next to diffusers' SDXL-ControlNet loop driven the way the official InstantID pipeline drives it
(face tokens appended to the prompt embeddings, IdentityNet called every step).

    python benchmarks/bench_pipeline.py [--tiny DIR] [--repeats 3]

Each variant runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_variant(variant: str, tiny: str, steps: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from faceid.face.kps import draw_kps
    from faceid.tiny.models import build_tiny
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    torch.set_num_threads(2)
    paths = build_tiny(tiny, faces=False)
    pipe = load_pipeline(paths["base_model"], paths["controlnet"], paths["face_adapter"], progress=False)
    kps = draw_kps((128, 128), np.array([[40, 48], [88, 48], [64, 68], [44, 92], [84, 92]]))
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    prompt = "a photo of a person"

    if variant == "ours":

        def once():
            return pipe(
                prompt,
                image_embeds=emb,
                image=kps,
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images
    else:
        from diffusers import StableDiffusionXLControlNetPipeline

        base = StableDiffusionXLControlNetPipeline(
            **{k: v for k, v in pipe.components.items() if k not in ("feature_extractor", "image_encoder")}
        )
        base.set_progress_bar_config(disable=True)

        def once():
            # Official structure: encode prompt, append face tokens (cfg negative = zero embedding), every step.
            pe, npe, pooled, npooled = base.encode_prompt(
                prompt, device="cpu", do_classifier_free_guidance=True
            )
            face = pipe.encode_face(emb, 1, True)
            return base(
                prompt_embeds=torch.cat([pe, face[1:]], 1),
                negative_prompt_embeds=torch.cat([npe, face[:1]], 1),
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=npooled,
                image=kps,
                num_inference_steps=steps,
                guidance_scale=5.0,
                controlnet_conditioning_scale=0.8,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "s_per_step": min(times) / steps, "peak_rss_mb": peak_mb}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", default=str(ROOT / "tiny"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tiny, args.steps, args.repeats)))
        return
    rows = []
    for variant in ("ours", "official-structure"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--tiny",
                args.tiny,
                "--steps",
                str(args.steps),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny SDXL, 128x128, {args.steps} steps, CFG on (best of {args.repeats})")
    print(f"{'variant':<22}{'s/step':>10}{'peak RSS MB':>14}")
    for r in rows:
        print(f"{r['variant']:<22}{r['s_per_step']:>10.4f}{r['peak_rss_mb']:>14.0f}")
    print(f"speed-up: {rows[1]['s_per_step'] / rows[0]['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
