"""Loading an item's images: files as RGB, with errors that name the item and the image."""

from __future__ import annotations

from .items import Item


def load_images(item: Item) -> list:
    """The item's images as RGB PIL images, or ItemError with the reason."""
    return [load_image(item)]


def load_image(item: Item):
    """Open the item's image as RGB, or raise ItemError with the reason."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import ItemError

    shown = item.image.name if item.image else "?"
    if item.image is None or not item.image.exists():
        raise ItemError(item.fail(f"image '{shown}' not found ({item.image})"))
    try:
        with Image.open(item.image) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "F", "CMYK", "YCbCr", "1"):
                raise ItemError(item.fail(f"image '{shown}' has unsupported mode {im.mode}"))
            return im.convert("RGB")
    except ItemError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ItemError(item.fail(f"image '{shown}' cannot be read ({type(exc).__name__}: {exc})")) from None
