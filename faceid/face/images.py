"""The one image loader: what face analysis, inference and training all read, so keypoints always match pixels.

EXIF orientation is applied, every mode (CMYK, 16-bit, palette, RGBA, grayscale) becomes 8-bit RGB, and images
over the decompression-bomb limit are refused with a clear error instead of a warning.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Same limit PIL warns at (~89 MP); larger images are refused rather than decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


_ORIENTATION = 0x0112  # EXIF tag
_ROTATED = (5, 6, 7, 8)  # orientations that swap width and height


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 = as stored); the one place the tag is read."""
    return img.getexif().get(_ORIENTATION, 1)


def oriented_size(path) -> tuple[int, int]:
    """(width, height) of ``path`` as :func:`load_image` returns it (EXIF rotation applied), read from the header
    without decoding the pixels."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if exif_orientation(img) in _ROTATED else (w, h)


class ImageLoadError(ValueError):
    """An image could not be read; the message names the file and the reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _stop_after(img: Image.Image, rows: int | None) -> bool:
    """Make PIL decode only the first ``rows`` rows of a plain (non-interlaced) PNG: the zip decoder is sequential,
    so it simply stops there. Not when EXIF (known before the pixels) may rotate the image."""
    w, h = img.size
    if rows is None or not 0 < rows < h or img.format != "PNG" or len(img.tile) != 1:
        return False
    t = img.tile[0]
    if t[0] != "zip" or tuple(t[1]) != (0, 0, w, h) or img.info.get("interlace") or "exif" in img.info:
        return False
    tile = (t[0], (0, 0, w, rows), *t[2:])
    img.tile = [ImageFile._Tile(*tile) if hasattr(ImageFile, "_Tile") else tile]
    return True


def load_image(
    path, max_pixels: int = MAX_PIXELS, name: str | None = None, rows: int | None = None
) -> Image.Image:
    """Open ``path`` (a path, ``bytes`` or a binary file object) as an 8-bit RGB PIL image with EXIF
    orientation applied.

    ``rows``: the caller uses only the first ``rows`` rows (a crop above them follows, as the training loader's at
    scale 1): a plain PNG from a path or bytes then stops decoding there and the rows below are undefined.

    Raises :class:`ImageLoadError` naming the file (or ``name``) for a missing, empty, corrupt, truncated,
    oversized or non-image file.
    """
    original = path
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            raise ImageLoadError(f"{name or '<bytes>'}: empty image data (0 bytes)")
        source = io.BytesIO(path)
        path = name or "<bytes>"
    elif hasattr(path, "read"):
        source, path = path, name or getattr(path, "name", "<stream>")
        rows = None  # a stream is read once
    else:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ImageLoadError(f"{path}: file not found")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"{path}: empty file (0 bytes)")
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageLoadError(f"{path}: {w}x{h} is over the {max_pixels}-pixel limit")
                partial = _stop_after(img, rows)
                img.load()
                if exif_orientation(img) != 1:
                    if partial:  # an eXIf chunk after the pixels: the rows were those of the unrotated image
                        return load_image(original, max_pixels, name)
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{path}: image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not an image or unsupported format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({exc})") from exc


_ARROW = None  # pyarrow once enable_arrow() imported it (False: not available)


def enable_arrow() -> bool:
    """Import pyarrow so that :func:`rgbx_view` can read PIL's storage without a copy. Long loops call it once
    (the import and first conversion take ~0.5 s, before any worker process forks); one-off conversions skip it."""
    global _ARROW
    if _ARROW is None:
        try:
            import pyarrow

            _ARROW = pyarrow if hasattr(Image.Image, "__arrow_c_array__") else False
        except ImportError:
            _ARROW = False
        if _ARROW:  # the first conversion imports pyarrow's lazy parts: here, not in each worker
            rgbx_view(Image.new("RGB", (2, 2)))
    return bool(_ARROW)


def rgbx_view(image: Image.Image) -> np.ndarray | None:
    """A read-only ``[H, W, 4]`` view of an RGB PIL image's own storage (R, G, B, pad), without a copy, through the
    Arrow C data interface (Pillow ≥ 11.2 with pyarrow, after :func:`enable_arrow`), or ``None`` (not enabled,
    other modes, an image stored in several blocks, older Pillow). ``np.asarray(image)`` instead goes through ``tobytes`` (chunked encode, join, copy:
    ~1–4 ms for a 1024² image, more on a busy machine), which dominated the conversions below."""
    pa = _ARROW
    if not pa or image.mode != "RGB" or not image.width or not image.height:
        return None
    try:
        flat = pa.array(image).flatten().to_numpy(zero_copy_only=True)
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException):
        return None
    if flat.size != image.width * image.height * 4:
        return None
    return flat.reshape(image.height, image.width, 4)


def to_bgr(image: Image.Image) -> np.ndarray:
    """PIL RGB → contiguous uint8 BGR array, the layout insightface expects.

    One OpenCV pass from the image's own storage (:func:`rgbx_view`), the same bytes as the numpy channel flip
    (which took 6–7 ms of a 1024² image, as much as the detector)."""
    import cv2

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    view = rgbx_view(rgb)
    if view is not None:
        return cv2.cvtColor(view, cv2.COLOR_RGBA2BGR)
    return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image → contiguous, writable uint8 ``[H, W, 3]`` RGB array (``np.array(image.convert("RGB"))``, faster)."""
    import cv2

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    view = rgbx_view(rgb)
    if view is not None:
        return cv2.cvtColor(view, cv2.COLOR_RGBA2RGB)
    return np.array(rgb)
