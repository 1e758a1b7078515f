"""Draw groundings on an image: one colour per phrase, the phrase and score written on each box."""

from __future__ import annotations

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
    for box, score, phrase in zip(grounding.boxes.tolist(), grounding.scores.tolist(), grounding.phrases):
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
