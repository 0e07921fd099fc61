"""Identity loss (``--id_loss_weight``): does the face the model would generate look like the reference person?

For each sample whose timestep is below ``--id_loss_max_timestep`` (and whose face was not CFG-dropped):

1. the one-step estimate of the clean latent from the step's prediction (ε: ``x0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ``;
   v: ``x0 = √ᾱ·x_t − √(1−ᾱ)·v̂``);
2. only the face region is decoded through the (frozen) VAE: the latent box covering what insightface's
   ``norm_crop`` would read for the target's keypoints, plus a margin of latent pixels — never the full image
   (a 1024² decode would dominate the step's memory);
3. the decoded crop is aligned to 112×112 with the similarity transform ``norm_crop`` uses (least-squares
   similarity of the 5 keypoints onto ``arcface_dst``, as skimage's ``SimilarityTransform.estimate``), warped with
   ``affine_grid``/``grid_sample`` (bilinear, zero border: cv2.warpAffine's defaults), so it is differentiable;
4. embedded by the recognizer ONNX (antelopev2's ``glintr100.onnx`` or any ``[N,3,112,112] → [N,D]`` model)
   run as a frozen torch module (:class:`faceid.face.onnx_module.OnnxModule`), with insightface's input normalisation for that model;
5. loss = 1 − cosine(embedding, reference embedding) — the reference is the sample's conditioning embedding (with
   ``--cross_id`` another image of the same person).

The VAE and the recognizer stay frozen: the gradient reaches only the trained modules, through the prediction.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from faceid.face.regions import ARCFACE_TEMPLATE

ALIGN_SIZE = 112


def similarity_transform(src, dst=ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2×3 least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto
    ``dst`` — Umeyama's estimate, what ``skimage.transform.SimilarityTransform.estimate`` (and so insightface's
    ``estimate_norm``) computes."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / n
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1
    u, sig, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise ValueError("degenerate keypoints")
    if rank == 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            r = u @ vt
        else:
            s = d[1]
            d[1] = -1
            r = u @ np.diag(d) @ vt
            d[1] = s
    else:
        r = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / s0.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * (r @ mu_s)
    return m


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def align_faces(images: torch.Tensor, matrices, size: int = ALIGN_SIZE) -> torch.Tensor:
    """``cv2.warpAffine(image, M, (size, size), borderValue=0)`` for a batch, differentiably. ``matrices``:
    ``[B, 2, 3]`` mapping image pixel coordinates to aligned-crop pixel coordinates (pixel centres at integers)."""
    b, _, h, w = images.shape
    thetas = []
    out_to_px = np.array(
        [[(size - 1) / 2, 0, (size - 1) / 2], [0, (size - 1) / 2, (size - 1) / 2], [0, 0, 1]]
    )
    px_to_in = np.array([[2 / max(w - 1, 1), 0, -1], [0, 2 / max(h - 1, 1), -1], [0, 0, 1]])
    for m in matrices:
        theta = px_to_in @ np.linalg.inv(_h(np.asarray(m, dtype=np.float64))) @ out_to_px
        thetas.append(theta[:2])
    theta = torch.as_tensor(np.stack(thetas), dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def face_latent_box(kps, latent_hw, factor: int = 8, margin: int = 2, size: int = ALIGN_SIZE):
    """``(y0, y1, x0, x1)`` in latent pixels: the region ``norm_crop`` reads for ``kps`` (target pixel frame),
    widened by ``margin`` latent pixels, inside the latent."""
    m = similarity_transform(kps)
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
    src = (np.linalg.inv(_h(m)) @ corners.T).T[:, :2]
    lh, lw = latent_hw
    x0 = int(np.clip(np.floor(src[:, 0].min() / factor) - margin, 0, lw - 1))
    x1 = int(np.clip(np.ceil((src[:, 0].max() + 1) / factor) + margin, x0 + 1, lw))
    y0 = int(np.clip(np.floor(src[:, 1].min() / factor) - margin, 0, lh - 1))
    y1 = int(np.clip(np.ceil((src[:, 1].max() + 1) / factor) + margin, y0 + 1, lh))
    return y0, y1, x0, x1


def _input_norm(model_proto) -> tuple[float, float]:
    """insightface's rule (ArcFaceONNX): mxnet exports with Sub and Mul among the first nodes take raw 0..255
    input, every other model (127.5, 127.5)."""
    names = [n.name for n in model_proto.graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if sub and mul else (127.5, 127.5)


class Recognizer(torch.nn.Module):
    """A face-recognition ONNX as a frozen torch module: aligned RGB 0..255 ``[N,3,112,112]`` → ``[N,D]``."""

    def __init__(self, onnx_path: str):
        super().__init__()
        import onnx

        from faceid.face.onnx_module import OnnxModule

        proto = onnx.load(str(onnx_path))
        self.mean, self.std = _input_norm(proto)
        self.net = OnnxModule(proto)
        self.net.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):  # always in eval mode (BatchNorm statistics are the recognizer's)
        return super().train(False)

    def forward(self, rgb255: torch.Tensor) -> torch.Tensor:
        return self.net((rgb255 - self.mean) / self.std)


class IdentityLoss:
    def __init__(self, recognizer_path: str, max_timestep: int, margin: int = 2, device="cpu"):
        from faceid.schema import EMBEDDING_DIM
        from faceid.train.errors import TrainingInputError

        self.recognizer = Recognizer(recognizer_path).to(device)
        with torch.no_grad():
            dim = self.recognizer(torch.zeros(1, 3, ALIGN_SIZE, ALIGN_SIZE, device=device)).shape[-1]
        if dim != EMBEDDING_DIM:  # the reference embeddings are antelopev2's (the index's)
            raise TrainingInputError(
                f"{recognizer_path} gives {dim}-d embeddings, the index holds {EMBEDDING_DIM}-d ones: use the "
                "recognizer that made the index's embeddings (antelopev2's glintr100.onnx)"
            )
        self.max_timestep = int(max_timestep)
        self.margin = int(margin)

    def x0_estimate(self, sched, noisy, pred, timesteps):
        ac = sched.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        noisy, pred = noisy.float(), pred.float()
        if sched.config.prediction_type == "v_prediction":
            return a * noisy - s * pred
        return (noisy - s * pred) / a

    def __call__(self, pred, noisy, timesteps, batch, sched, vae):
        """``(mean loss over the selected samples, number selected)``; ``(None, 0)`` when none is."""
        keep = timesteps < self.max_timestep
        if "drop_face" in batch:
            keep &= ~torch.as_tensor(batch["drop_face"], device=timesteps.device)
        rows = torch.nonzero(keep).flatten().tolist()
        if not rows:
            return None, 0
        x0 = self.x0_estimate(sched, noisy[rows], pred[rows], timesteps[rows])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        losses = []
        for j, b in enumerate(rows):
            kps = batch["kps"][b].detach().cpu().numpy().astype(np.float64)
            y0, y1, x0_, x1 = face_latent_box(kps, x0.shape[-2:], factor, self.margin)
            z = x0[j : j + 1, :, y0:y1, x0_:x1] / vae.config.scaling_factor + shift
            # An fp32 VAE decodes in fp32 even under fp16 autocast (SDXL's VAE overflows in fp16).
            fp32 = vae.dtype == torch.float32
            with torch.autocast(z.device.type, enabled=False) if fp32 else contextlib.nullcontext():
                crop = vae.decode(z.to(vae.dtype)).sample.float()
            m = similarity_transform(kps - np.array([x0_ * factor, y0 * factor]))
            aligned = align_faces((crop.clamp(-1, 1) + 1) * 127.5, [m])
            emb = self.recognizer(aligned).float()
            ref = batch["face_embeds"][b : b + 1].to(emb.device).float()
            losses.append(1 - F.cosine_similarity(emb, ref, dim=-1))
        return torch.cat(losses).mean(), len(rows)
