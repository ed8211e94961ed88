"""Image inputs: files read with PIL, decoded eagerly so a broken file fails here, by name."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from attnscope.errors import AttnscopeError

ImageSource = str | Path | Image.Image


class ImageError(AttnscopeError):
    """An image file that does not exist or cannot be decoded."""


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; raises ``ImageError`` naming a bad file."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not inside the processor
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode image {path}: {err}") from err


def load_images(sources: ImageSource | list[ImageSource]) -> list[Image.Image]:
    """One or several images as a list of RGB PIL images."""
    items = sources if isinstance(sources, list | tuple) else [sources]
    if not items:
        raise ImageError("no image given")
    return [load_image(s) for s in items]
