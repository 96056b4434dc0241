"""An item's images as RGB pictures, faithfully, within bounds; or an ItemError naming the image and the reason.

- Sources: files (regular files only: a FIFO or a device would block or never end; at most `MAX_IMAGE_BYTES`),
  `data:` URIs and inline base64, table bytes, and URLs (through `io/fetch.py`, when fetching is on).
- Pixels: EXIF orientation is applied; transparency is composited on white; 16-bit and 32-bit integer images
  are scaled from 0-65535, float images from 0-1 (or 0-255); what cannot be converted faithfully (negative or
  non-finite values, unknown modes) is refused rather than answered from blank pixels.
- Size: Pillow refuses decompression bombs; a picture far larger than the processor will use is decoded at a
  reduced scale where the format allows (JPEG's draft mode) or reduced right after decoding, before the processor
  resizes it, so a 13,000-pixel scan costs what its few hundred visual tokens need.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from pathlib import Path

from ..errors import ItemError
from .items import ImageRef, Item

MAX_IMAGE_BYTES = 256 << 20  # an encoded image larger than this is refused
# Pictures are decoded reduced only when they are both this large and over 4x the processor's pixel budget: a
# photo of ordinary size reaches the processor exactly as it is.
REDUCE_ABOVE_PIXELS = 16_000_000
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_DIRECT = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", *_ALPHA)
_INT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F")  # modes Image.reduce takes


def load_images(item: Item, fetcher=None, max_pixels: int | None = None) -> list:
    """The item's images as RGB PIL images (`fetcher` fetches URLs; `max_pixels`: the most pixels the model's
    processor uses per image, to decode large pictures at a reduced scale)."""
    if not item.images:
        raise ItemError(item.fail("no image"))
    return [load_image(item, ref, fetcher, max_pixels) for ref in item.images]


def load_image(item: Item, ref: ImageRef | None = None, fetcher=None, max_pixels: int | None = None):
    """One image of the item (its first by default) as an RGB PIL image, or ItemError with the reason."""
    ref = ref or item.images[0]
    source = source_of(item, ref, fetcher)
    try:
        return decode(source, max_pixels)
    except _Refused as exc:
        raise ItemError(item.fail(f"image '{ref.label}' {exc}")) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's, not the run's
        if type(exc).__name__ == "UnidentifiedImageError":
            raise ItemError(item.fail(f"image '{ref.label}' {_not_an_image(source)}")) from None
        detail = str(exc).splitlines()[0] if str(exc) else ""
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image bytes", detail)
        raise ItemError(item.fail(f"image '{ref.label}' cannot be read ({type(exc).__name__}: {detail})")) from None


def _not_an_image(source) -> str:
    """What bytes that no decoder recognises are: their size and how they begin (completes "image 'x' ...")."""
    if isinstance(source, io.BytesIO):
        data = source.getvalue()
        size, head = len(data), data[:24]
    else:
        try:
            size = os.stat(source).st_size
            with open(source, "rb") as f:
                head = f.read(24)
        except OSError:
            size, head = -1, b""
    if size == 0:
        return "cannot be read: it is empty (0 bytes)"
    try:
        text = head.decode("utf-8")
        printable = all(c.isprintable() or c in "\t\r\n" for c in text)
    except UnicodeDecodeError:
        printable = False
    begins = f"text {' '.join(text.split())[:20]!r}" if printable else f"bytes {head[:8].hex(' ')}"
    return f"cannot be read: its {size:,} bytes are not an image in a format sgl reads (they begin with {begins})"


def source_of(item: Item, ref: ImageRef, fetcher, what: str = "image"):
    """A path or a bytes buffer to decode (`what`: how messages name it, "image" or "video")."""
    if ref.kind == "path":
        return _regular_file(item, ref, what)
    if ref.kind == "bytes":
        data = ref.value
    elif ref.kind == "data":
        data = _data_uri(item, ref, what)
    elif ref.kind == "url":
        if fetcher is None:
            raise ItemError(item.fail(f"{what} '{ref.label}' is a URL and fetching is off (--no-fetch)"))
        from .fetch import FetchError

        try:
            data = fetcher.get(ref.value)
        except FetchError as exc:
            raise ItemError(item.fail(f"{what} '{ref.label}' could not be fetched: {exc}")) from None
    elif ref.kind == "unsupported":
        scheme = ref.value.split(":", 1)[0].lower()
        raise ItemError(item.fail(f"{what} '{ref.label}': {scheme}:// URLs are not supported (sgl reads files, "
                                  "file:// and data: URIs, and http(s) URLs)"))
    else:
        raise ItemError(item.fail(f"{what} '{ref.label}': unknown kind {ref.kind!r}"))
    if len(data) > MAX_IMAGE_BYTES:
        raise ItemError(item.fail(f"{what} '{ref.label}' is {len(data):,} bytes, over {MAX_IMAGE_BYTES >> 20} MiB"))
    return io.BytesIO(data)


def _regular_file(item: Item, ref: ImageRef, what: str) -> Path:
    path: Path = ref.value
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ItemError(item.fail(f"{what} '{ref.label}' not found ({path})")) from None
    except OSError as exc:
        raise ItemError(item.fail(f"{what} '{ref.label}' cannot be read ({exc.strerror or exc})")) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
        raise ItemError(item.fail(f"{what} '{ref.label}' is {kind} ({path})"))
    if st.st_size > MAX_IMAGE_BYTES:
        raise ItemError(item.fail(f"{what} '{ref.label}' is {st.st_size:,} bytes, over {MAX_IMAGE_BYTES >> 20} MiB"))
    return path


def _data_uri(item: Item, ref: ImageRef, what: str) -> bytes:
    header, sep, payload = ref.value.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ItemError(item.fail(f"{what} '{ref.label}' is not a base64 data URI (data:{what}/...;base64,...)"))
    media = header[5:].split(";")[0].strip().lower()
    if media and not media.startswith(f"{what}/") and media != "application/octet-stream":
        article = "an image" if what == "image" else "a video"
        raise ItemError(item.fail(f"{what} '{ref.label}' is {media}, not {article}"))
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ItemError(item.fail(f"{what} '{ref.label}' is over {MAX_IMAGE_BYTES >> 20} MiB"))
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ItemError(item.fail(f"{what} '{ref.label}' is not valid base64")) from None


class _Refused(ValueError):
    """An image that cannot be converted faithfully (the message completes "image 'x' ...")."""


def decode(source, max_pixels: int | None = None):
    """An RGB PIL image from a path or a file object (see the module doc for what is converted and refused)."""
    import warnings

    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Pillow warns above 89 M pixels (and refuses above 179 M): a large picture is reduced below, not a bomb.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode(Image, ImageOps, source, max_pixels)


def _decode(Image, ImageOps, source, max_pixels):
    with Image.open(source) as opened:
        w, h = opened.size
        if _too_large(w, h, max_pixels) and opened.format == "JPEG":
            opened.draft("RGB", _reduced(w, h, max_pixels))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
        opened.load()
        im = opened
        if _too_large(*im.size, max_pixels):  # reduce first: every later step then works on the small picture
            factor = _factor(*im.size, max_pixels)
            im = im.reduce(factor) if im.mode in _REDUCIBLE else to_rgb(im).reduce(factor)
        transposed = ImageOps.exif_transpose(im)  # a copy, rotated when EXIF says so
        rgb = to_rgb(transposed if transposed is not None else im)
    return rgb


def _too_large(w: int, h: int, max_pixels: int | None) -> bool:
    return bool(max_pixels) and w * h > max(4 * max_pixels, REDUCE_ABOVE_PIXELS)


def _reduced(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """The size to decode at: still at least twice the processor's budget, so its own resize decides the pixels."""
    f = (w * h / (4 * max_pixels)) ** 0.5
    return max(1, int(w / f)), max(1, int(h / f))


def _factor(w: int, h: int, max_pixels: int) -> int:
    """An integer reduction that keeps at least 4x the processor's pixel budget."""
    factor = 1
    while (w // (factor + 1)) * (h // (factor + 1)) >= 4 * max_pixels:
        factor += 1
    return factor


def to_rgb(im):
    """An RGB image of the same picture: alpha over white, high bit depths scaled, other modes (CMYK, YCbCr, LAB,
    HSV, palettes) converted; or a ValueError saying why it cannot be ("has mode X, which ...")."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode in _ALPHA or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im
    if mode in _DIRECT:
        return im.convert("RGB")
    if mode in _INT or mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise _Refused(f"has {mode} values from {a.min()} to {a.max()}, outside 0-65535: it cannot be shown "
                           "faithfully as 8-bit colour")
        return _grey(np.round(a * (255 / 65535)))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise _Refused("has non-finite (NaN or infinite) float values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise _Refused(f"has float values from {lo:g} to {hi:g}, outside 0-1 and 0-255: it cannot be shown "
                           "faithfully as 8-bit colour")
        return _grey(np.round(a * 255 if hi <= 1 else a))
    raise _Refused(f"has mode {mode}, which sgl cannot convert to RGB faithfully")


def _grey(values):
    import numpy as np
    from PIL import Image

    return Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
