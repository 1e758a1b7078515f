"""Draw groundings on an image (one colour per phrase, the phrase and score written on each box), a
segmentation mask under them, and the token-probability bar chart of a box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mdetr.inference.postprocess import Grounding

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
]


def draw_groundings(image: Image.Image, grounding: Grounding, *, caption: str | None = None) -> Image.Image:
    """A copy of ``image`` with the boxes drawn; the caption (if given) is written in a band underneath."""
    image = image.convert("RGB")
    font = ImageFont.load_default()
    band = 18 if caption else 0
    canvas = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours: dict[str, tuple[int, int, int]] = {}
    width = max(2, round(min(image.size) / 150))
    for box, score, phrase in zip(
        grounding.boxes.tolist(), grounding.scores.tolist(), grounding.phrases, strict=True
    ):
        colour = colours.setdefault(phrase, _PALETTE[len(colours) % len(_PALETTE)])
        draw.rectangle(box, outline=colour, width=width)
        label = f"{phrase} {score:.2f}"
        x0, y0 = box[0], max(0.0, box[1] - 12)
        tw = draw.textlength(label, font=font)
        draw.rectangle([x0, y0, x0 + tw + 4, y0 + 12], fill=colour)
        draw.text((x0 + 2, y0), label, fill=(255, 255, 255), font=font)
    if caption:
        draw.text((4, image.height + 3), caption, fill=(0, 0, 0), font=font)
    return canvas


def draw_segmentation(image: Image.Image, mask: np.ndarray, grounding: Grounding, *,
                      caption: str | None = None, colour: tuple[int, int, int] = (255, 40, 40),
                      alpha: float = 0.5) -> Image.Image:
    """``image`` with the region ``mask`` ((H, W) bool, the image's size) tinted in ``colour`` at opacity
    ``alpha``, then the boxes and caption as :func:`draw_groundings`."""
    image = image.convert("RGB")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"the mask is {mask.shape[::-1]} (width, height), the image {image.size}")
    pixels = np.asarray(image, dtype=np.float32)
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float32)
    tinted = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return draw_groundings(tinted, grounding, caption=caption)


def draw_token_map(token_probs: Sequence[float], tokens: Sequence[str], *, no_object: float | None = None,
                   title: str = "", bar_width: int = 22, height: int = 120) -> Image.Image:
    """A bar chart of one box's probability over the caption's tokens (MDETR paper Figure 3).

    token_probs: (L,) probabilities of the L tokens in ``tokens`` (specials included, as tokenized);
    no_object: the box's no-object probability, drawn as a last grey bar when given.
    """
    probs = [float(p) for p in token_probs]
    labels = list(tokens)
    if len(probs) != len(labels):
        raise ValueError(f"got {len(probs)} probabilities for {len(labels)} tokens")
    colours = [_PALETTE[2]] * len(probs)
    if no_object is not None:
        probs.append(float(no_object))
        labels.append("no object")
        colours.append((150, 150, 150))
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_height = int(max([scratch.textlength(t, font=font) for t in labels] + [10])) + 6
    top = 24 if title else 8
    width = max(bar_width * len(probs) + 40, int(scratch.textlength(title, font=font)) + 10)
    canvas = Image.new("RGB", (width, top + height + label_height + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    base = top + height
    draw.line([(30, top), (30, base), (width - 4, base)], fill=(0, 0, 0))
    for value, y in ((1.0, top), (0.5, top + height // 2), (0.0, base)):
        draw.text((2, y - 5), f"{value:.1f}", fill=(0, 0, 0), font=font)
    for i, (p, label, colour) in enumerate(zip(probs, labels, colours, strict=True)):
        x0 = 32 + i * bar_width
        bar = round(min(max(p, 0.0), 1.0) * height)
        if bar:
            draw.rectangle([x0 + 2, base - bar, x0 + bar_width - 3, base], fill=colour)
        text = Image.new("RGB", (label_height, 12), (255, 255, 255))  # written sideways, then rotated
        ImageDraw.Draw(text).text((2, 0), label, fill=(0, 0, 0), font=font)
        canvas.paste(text.rotate(-90, expand=True), (x0 + bar_width // 2 - 6, base + 4))
    return canvas
