"""Read and check what a client sends to the grounding API: a multipart body, an image and a sentence.

Everything here treats its input as untrusted. A problem the client can fix becomes a :class:`RequestError`
carrying a 4xx status and a sentence that says what was wrong; nothing a client sends should raise anything
else.
"""

from __future__ import annotations

import io
import math
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart import FormParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

# Formats a browser or camera produces; Pillow's rarer decoders are not exposed to uploads.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FORM_FIELDS = ("image", "text", "classes", "threshold", "top_k")
_BYTES_PER_CHAR = 4  # the most a UTF-8 character takes


class RequestError(Exception):
    """A client mistake: ``status`` is the HTTP status (4xx) to answer with, the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """What one request may hold. ``threshold`` is the score cut used when a request gives none."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_text_chars: int = 1000
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")


@dataclass(frozen=True)
class GroundingQuery:
    """One checked request: the image file's bytes (decoded later, off the event loop), and either a
    sentence (``text``) or class names (``classes``), with the score cut and box cap to apply."""

    image: bytes
    text: str | None
    classes: tuple[str, ...] | None
    threshold: float
    top_k: int | None


async def read_form(content_type: str, content_length: str | None, body: AsyncIterator[bytes],
                    limits: ServeLimits) -> dict[str, bytes]:
    """The raw bytes of each part of a ``multipart/form-data`` body, by field name.

    The body is fed to the parser as it arrives and refused (413) as soon as it passes
    ``limits.max_upload_bytes``, so an oversized upload is never held whole. Field values stay bytes: text is
    decoded strictly later, so binary or non-UTF-8 text is reported instead of being guessed at.
    """
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise RequestError(415, "send the request as multipart/form-data with an 'image' file and a 'text' "
                                f"field (got Content-Type {content_type or 'none'!r})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "the multipart/form-data Content-Type has no boundary")
    declared = int(content_length) if content_length and content_length.isdigit() else None
    if declared is not None and declared > limits.max_upload_bytes:
        raise RequestError(413, _too_large(declared, limits))
    parts: dict[str, bytes] = {}

    def keep(name: bytes | None, value: bytes) -> None:
        field = (name or b"").decode("utf-8", "replace")
        if field in parts:
            raise RequestError(400, f"the form field {field!r} is given more than once")
        parts[field] = value

    parser = FormParser("multipart/form-data", lambda f: keep(f.field_name, f.value or b""),
                        lambda f: keep(f.field_name, f.file_object.getvalue()), boundary=boundary,
                        config={"MAX_MEMORY_FILE_SIZE": math.inf})
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limits.max_upload_bytes:
                raise RequestError(413, _too_large(received, limits, at_least=True))
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise RequestError(400, f"the multipart/form-data body is malformed: {err}") from None
    return parts


def _too_large(size: int, limits: ServeLimits, *, at_least: bool = False) -> str:
    mib = limits.max_upload_bytes / 2**20
    return (f"the upload is {'at least ' if at_least else ''}{size:,} bytes; this server accepts at most "
            f"{limits.max_upload_bytes:,} bytes ({mib:.3g} MiB)")


def parse_query(parts: dict[str, bytes], limits: ServeLimits) -> GroundingQuery:
    """Check the form fields: an ``image``, exactly one of ``text`` / ``classes`` (comma-separated names),
    and optional ``threshold`` (0..1) and ``top_k`` (>= 1)."""
    unknown = sorted(set(parts) - set(FORM_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown form field {unknown[0]!r}; the fields are {', '.join(FORM_FIELDS)}")
    image = parts.get("image")
    if not image:
        raise RequestError(400, "the 'image' file is missing or empty")
    if ("text" in parts) == ("classes" in parts):
        raise RequestError(400, "give exactly one of 'text' (a sentence to ground) or 'classes' "
                                "(comma-separated class names)")
    text = classes = None
    if "text" in parts:
        text = decode_text(parts["text"], "text", limits)
    else:
        names = [n.strip() for n in decode_text(parts["classes"], "classes", limits).split(",")]
        classes = tuple(n for n in names if n)
        if not classes:
            raise RequestError(400, "the 'classes' field names no class; separate names with commas")
    threshold = _number(parts.get("threshold"), "threshold", float, limits.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise RequestError(400, f"'threshold' must be between 0 and 1, got {threshold}")
    top_k = _number(parts.get("top_k"), "top_k", int, None)
    if top_k is not None and top_k < 1:
        raise RequestError(400, f"'top_k' must be at least 1, got {top_k}")
    return GroundingQuery(image, text, classes, threshold, top_k)


def decode_text(raw: bytes, field: str, limits: ServeLimits) -> str:
    """A form field as text: strict UTF-8, no control characters, not blank, at most ``max_text_chars``."""
    if len(raw) > _BYTES_PER_CHAR * limits.max_text_chars:
        raise RequestError(413, f"the {field!r} field is {len(raw):,} bytes; at most "
                                f"{limits.max_text_chars} characters are accepted")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the {field!r} field is not UTF-8 text (invalid byte at position "
                                f"{err.start})") from None
    control = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise RequestError(400, f"the {field!r} field holds the control character {control!r}; send plain "
                                "text")
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"the {field!r} field has {len(text):,} characters; at most "
                                f"{limits.max_text_chars} are accepted")
    if not text.strip():
        raise RequestError(400, f"the {field!r} field is empty")
    return text


def _number(raw: bytes | None, field: str, kind: type, default: float | int | None) -> float | int | None:
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        shown = raw[:20].decode("utf-8", "replace")
        raise RequestError(400, f"'{field}' must be {'a number' if kind is float else 'an integer'}, got "
                                f"{shown!r}") from None
    if kind is float and not math.isfinite(value):
        raise RequestError(400, f"'{field}' must be a finite number, got {value}")
    return value


def decode_image(data: bytes, limits: ServeLimits) -> Image.Image:
    """An RGB image from an uploaded file, upright as its EXIF orientation says.

    The size is read from the header and checked against ``limits.max_pixels`` before any pixel is decoded,
    so a decompression bomb is refused (413) without allocating it. Images with transparency are composited
    on white (as the page shows them); palette, grayscale, CMYK and other modes become RGB; 16-bit and float
    grayscale are scaled to 8 bits.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"the image is too large: {err}") from None
    except UnidentifiedImageError:
        raise RequestError(400, "the uploaded file is not an image in a known format (one of "
                                f"{', '.join(IMAGE_FORMATS)})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is the client's file
        raise RequestError(400, f"the uploaded file is not a readable image: {_reason(err)}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise RequestError(413, f"the image is {width}x{height} = {width * height:,} pixels; this server "
                                f"accepts at most {limits.max_pixels:,}")
    if width == 0 or height == 0:
        raise RequestError(400, f"the image is {width}x{height} pixels")
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt pixel data
        raise RequestError(400, f"the {image.format} image is truncated or corrupt: {_reason(err)}") from None
    return to_rgb(_upright(image))


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


def _upright(image: Image.Image) -> Image.Image:
    """The image rotated/flipped as its EXIF orientation tag says; an unreadable tag is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose an otherwise good image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB (see :func:`decode_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0.0) > 255 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
