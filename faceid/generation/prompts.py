"""Prompt-weighting syntax (the ``(word:1.2)`` form the official ``_full`` pipeline and most UIs accept).

* ``(text:1.5)`` — weight 1.5; ``(text)`` — ×1.1; ``[text]`` — ÷1.1; brackets nest and multiply;
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` — the literal character;
* an unclosed bracket acts until the end; a stray ``)`` or ``]`` is kept as text.

:func:`parse_weights` returns ``[(text, weight), ...]`` with neighbouring pieces of equal weight merged;
:func:`uses_weights` tells whether a prompt needs the weighted encoder at all (plain prompts keep the plain one).
"""

from __future__ import annotations

import re

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
