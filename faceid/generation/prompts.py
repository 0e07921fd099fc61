"""Prompt-weighting syntax (the ``(word:1.2)`` form the official ``_full`` pipeline and most UIs accept).

* ``(text:1.5)`` — weight 1.5; ``(text)`` — ×1.1; ``[text]`` — ÷1.1; brackets nest and multiply;
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` — the literal character;
* an unclosed bracket acts until the end; a stray ``)`` or ``]`` is kept as text.

:func:`parse_weights` returns ``[(text, weight), ...]`` with neighbouring pieces of equal weight merged;
:func:`uses_weights` tells whether a prompt needs the weighted encoder at all (plain prompts keep the plain one).

:func:`encode_weighted_prompt` is the pipeline's encoder for weighted prompts and prompts longer than one CLIP
window (the pipeline's method of the same name calls it).
"""

from __future__ import annotations

import math
import re

import torch

UP = 1.1
_TOKEN = re.compile(
    r"\\[\\()\[\]]"  # escaped bracket or backslash
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ":1.2)" closes a weighted group
    r"|[()\[\]]"
    r"|[^\\()\[\]:]+"
    r"|[\\:]"
)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) car"`` → ``[("a ", 1.0), ("red", 1.5), (" car", 1.0)]``."""
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if len(tok) == 2 and tok[0] == "\\":
            pieces.append([tok[1], 1.0])
        elif tok == "(":
            rounds.append(len(pieces))
        elif tok == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif tok == ")" and rounds:
            scale(rounds.pop(), UP)
        elif tok == "]" and squares:
            scale(squares.pop(), 1 / UP)
        else:
            pieces.append([tok, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, 1 / UP)
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, float(w)) for t, w in merged if t]


def uses_weights(text: str | None) -> bool:
    """True when ``text`` has weighting syntax (brackets or escapes) that the plain tokenizer would read literally."""
    return bool(text) and any(c in text for c in "()[]\\")


# ---- prompt windows: (word:1.2) weights and prompts over 77 tokens for SDXL's two encoders ------------
def _token_ids(tokenizer, text: str) -> list[int]:
    """Token ids without BOS/EOS, with no length limit (and without transformers' too-long warning)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


def _token_count(tokenizer, text: str) -> int:
    return len(_token_ids(tokenizer, text))


def _weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids of ``text`` without the syntax, and each token's weight."""
    ids, weights = [], []
    for piece, weight in parse_weights(text):
        piece_ids = _token_ids(tokenizer, piece)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def _encode_windows(tokenizer, encoder, ids, weights, windows: int, device, clip_skip):
    """``windows`` CLIP windows of ``[BOS] 75 tokens [EOS] pad`` → (hidden ``[1, 77*windows, D]``, pooled of the
    first window or None for an encoder without projection)."""
    size = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hidden, pooled = [], None
    for w in range(windows):
        chunk, chunk_w = ids[w * size : (w + 1) * size], weights[w * size : (w + 1) * size]
        filler = size - len(chunk)
        row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * filler
        row_w = [1.0, *chunk_w, 1.0] + [1.0] * filler
        out = encoder(torch.tensor([row], device=device), output_hidden_states=True)
        h = out.hidden_states[-2] if clip_skip is None else out.hidden_states[-(clip_skip + 2)]
        if any(x != 1.0 for x in row_w):
            h = h * torch.tensor(row_w, device=h.device, dtype=h.dtype)[None, :, None]
        hidden.append(h)
        if w == 0 and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
            pooled = out[0]
    return torch.cat(hidden, dim=1), pooled


def wants_weighting(pipe, *texts) -> bool:
    """Weighting syntax, or more tokens than one CLIP window holds, in any of ``texts`` (str or lists)."""
    flat = [t for x in texts if x is not None for t in ([x] if isinstance(x, str) else x)]
    if any(uses_weights(t) for t in flat):
        return True
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        if tok is not None and any(_token_count(tok, t) > tok.model_max_length - 2 for t in flat):
            return True
    return False


def encode_weighted_prompt(
    pipe,
    prompt,
    prompt_2=None,
    device=None,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt=None,
    negative_prompt_2=None,
    clip_skip: int | None = None,
):
    """``encode_prompt`` with ``(word:1.2)`` weights and no 77-token limit, for SDXL's two encoders.

    Each prompt is cut into windows of 75 tokens, each encoded as ``[BOS] window [EOS] padding`` exactly as
    diffusers encodes a short prompt, and the windows' hidden states are concatenated (the pooled embedding
    is the first window's). A token's hidden state is multiplied by its weight. Positive and negative prompts
    are padded with empty windows to the same length. Returns the same four tensors as ``encode_prompt``.
    """
    device = device or pipe._execution_device
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts_2 = prompt_2 or prompts
    prompts_2 = [prompts_2] * len(prompts) if isinstance(prompts_2, str) else list(prompts_2)
    pairs = [
        (tok, enc)
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    ]
    if any(tok is None or enc is None for tok, enc in pairs):
        raise ValueError("prompt weighting needs both SDXL tokenizers and text encoders")
    zero_negative = negative_prompt is None and pipe.config.force_zeros_for_empty_prompt
    rows = [list(zip(prompts, prompts_2))]
    if do_classifier_free_guidance and not zero_negative:
        neg = negative_prompt or ""
        neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
        neg_2 = negative_prompt_2 or neg
        neg_2 = [neg_2] * len(prompts) if isinstance(neg_2, str) else list(neg_2)
        if len(neg) != len(prompts):
            raise ValueError(f"negative_prompt has {len(neg)} entries for {len(prompts)} prompts")
        rows.append(list(zip(neg, neg_2)))
    tokenized = [
        [[_weighted_tokens(tok, text) for (tok, _), text in zip(pairs, texts)] for texts in row]
        for row in rows
    ]
    window = pipe.tokenizer.model_max_length - 2
    windows = max(1, *(math.ceil(len(ids) / window) for row in tokenized for item in row for ids, _ in item))
    out = []
    for row in tokenized:
        embeds, pooled = [], []
        for item in row:
            per_encoder = []
            for (tok, enc), (ids, weights) in zip(pairs, item):
                hidden, pool = _encode_windows(tok, enc, ids, weights, windows, device, clip_skip)
                per_encoder.append(hidden)
                if pool is not None:
                    pooled.append(pool)
            embeds.append(torch.cat(per_encoder, dim=-1))
        out.append((torch.cat(embeds), torch.cat(pooled)))
    dtype = pipe.text_encoder_2.dtype
    prompt_embeds, pooled_prompt_embeds = out[0]
    if len(out) > 1:
        negative_prompt_embeds, negative_pooled_prompt_embeds = out[1]
    elif do_classifier_free_guidance:
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
    else:
        negative_prompt_embeds = negative_pooled_prompt_embeds = None

    def rep(t):
        return None if t is None else t.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

    return (
        rep(prompt_embeds),
        rep(negative_prompt_embeds),
        rep(pooled_prompt_embeds),
        rep(negative_pooled_prompt_embeds),
    )
