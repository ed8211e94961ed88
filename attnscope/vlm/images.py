"""Image inputs: files read with PIL, decoded eagerly so a broken file fails here, by name; bounded
copies and compact encodings for what is drawn (overlays, HTML pages)."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from attnscope.errors import AttnscopeError

ImageSource = str | Path | Image.Image
JPEG_QUALITY = 85
OVERLAY_SIDE = 512  # longest side of drawn overlays (PNG and interactive), in pixels


class ImageError(AttnscopeError):
    """An image file that does not exist, cannot be decoded or is too large to decode safely."""


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path or a PIL image (itself when RGB); raises ``ImageError`` naming
    a bad file.

    A file over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, where PIL starts
    warning) is refused before it is decoded.
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")  # no full-size copy
    path = Path(source).expanduser()
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(
            f"image {path} is too large to decode safely: {err} Downscale it first (e.g. to at "
            "most 4096 px on the longest side: the model's processor resizes it to far fewer "
            "pixels anyway), or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust the file."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode image {path}: {err}") from err
    try:
        with opened as image:
            image.load()  # decode now: truncated files fail here, not inside the processor
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode image {path}: {err}") from err


def load_images(sources: ImageSource | list[ImageSource]) -> list[Image.Image]:
    """One or several images as a list of RGB PIL images."""
    items = sources if isinstance(sources, list | tuple) else [sources]
    if not items:
        raise ImageError("no image given")
    return [load_image(s) for s in items]


def fit_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """``size`` (width, height) scaled down, aspect kept, to at most ``longest`` px per side."""
    scale = min(1.0, longest / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at ``size`` (itself when it already has it), as RGB; shrinking large images by
    integer factors first keeps it fast and its memory bounded by the output."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.convert("RGB") if image.mode != "RGB" else image


def data_uri(image: Image.Image) -> str:
    """``image`` as a base64 ``data:`` URI, PNG or JPEG (quality 85), whichever is smaller."""
    encoded = {}
    for fmt, options in (("png", {"optimize": True}), ("jpeg", {"quality": JPEG_QUALITY})):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, fmt, **options)
        encoded[fmt] = buffer.getvalue()
    fmt = min(encoded, key=lambda f: len(encoded[f]))
    return f"data:image/{fmt};base64,{base64.b64encode(encoded[fmt]).decode()}"
