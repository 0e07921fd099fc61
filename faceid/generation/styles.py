"""Style presets: a prompt template (``{prompt}`` is the user's text) and words added to the negative prompt."""

from __future__ import annotations

NO_STYLE = "(No style)"

STYLES: dict[str, tuple[str, str]] = {
    NO_STYLE: ("{prompt}", ""),
    "Photograph": (
        "professional photograph of {prompt}, natural light, 50mm lens, sharp focus, highly detailed",
        "painting, drawing, illustration, cartoon, anime, render, blurry",
    ),
    "Film noir": (
        "film noir still of {prompt}, black and white, dramatic shadows, high contrast, 1940s crime film",
        "colour, bright, cheerful, cartoon, anime",
    ),
    "Watercolor": (
        "watercolor painting of {prompt}, soft washes, paper texture, loose brush strokes, pastel tones",
        "photograph, photo, realistic, 3d render, harsh lines",
    ),
    "Neon": (
        "{prompt}, neon-lit city street at night, magenta and cyan glow, rain reflections, cyberpunk mood",
        "daylight, dull, flat lighting, sepia",
    ),
    "Line art": (
        "clean line art drawing of {prompt}, black ink on white, minimal, elegant contours",
        "photograph, colour, shading, texture, realistic",
    ),
    "Snow": (
        "{prompt}, in a snowy winter forest, falling snowflakes, cold blue light, breath visible",
        "summer, beach, desert, warm colours",
    ),
    "Mars": (
        "{prompt}, on the surface of Mars, red dust, spacesuit, distant rover, cinematic sci-fi",
        "earth, trees, ocean, cartoon",
    ),
}


def apply_style(style: str | None, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
    """``(prompt, negative_prompt)`` with the preset ``style`` applied (unknown names are refused)."""
    style = style or NO_STYLE
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {list(STYLES)}")
    template, negative = STYLES[style]
    prompt = template.replace("{prompt}", prompt.strip() or "a person")
    negative_prompt = ", ".join(p for p in (negative, (negative_prompt or "").strip()) if p)
    return prompt, negative_prompt
