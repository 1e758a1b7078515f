"""The web demo's HTTP API, in-process through FastAPI's TestClient: results equal the predictor's, every
kind of bad input gets its 4xx and the server keeps serving, concurrent requests get their own results."""

import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from mdetr.cli import main
from mdetr.inference.predictor import Predictor
from mdetr.serve import RequestError, ServeLimits, create_app, decode_image

CAPTION = "a red circle and a blue square"
LIMITS = ServeLimits(max_upload_bytes=200_000, max_pixels=300 * 300, max_text_chars=120, threshold=0.05)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, LIMITS, threads=3)) as client:
        yield client


@pytest.fixture(scope="module")
def scenes(shapes_dir):
    """Distinct RGB scenes: the val and val_unseen images and their mirror images."""
    paths = sorted((shapes_dir / "images").glob("val*/*.png"))
    images = [Image.open(p).convert("RGB") for p in paths]
    return images + [ImageOps.mirror(im) for im in images]


def encode(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def post(client, image_bytes, **fields):
    return client.post("/v1/ground", files={"image": ("scene.png", image_bytes, "image/png")}, data=fields)


def assert_same(detections, grounding):
    """The JSON detections are the predictor's Grounding, rounded as the API rounds."""
    assert len(detections) == len(grounding.scores)
    for det, box, score, phrase, spans in zip(detections, grounding.boxes.tolist(), grounding.scores.tolist(),
                                              grounding.phrases, grounding.spans, strict=True):
        assert det["box"] == pytest.approx(box, abs=0.006)
        assert det["score"] == pytest.approx(score, abs=6e-5)
        assert det["phrase"] == phrase
        assert det["span"] == [list(s) for s in spans]


@pytest.fixture(scope="module")
def good(client, predictor, scenes):
    """A good request and what the predictor says directly for it; sent again after every bad request."""
    image = scenes[0]
    expected = predictor.predict(image, CAPTION, threshold=0.0, top_k=4)
    assert len(expected.scores) == 4

    def check():
        response = post(client, encode(image), text=CAPTION, threshold="0", top_k="4")
        assert response.status_code == 200, response.text
        assert_same(response.json()["detections"], expected)

    return check


def test_ground_equals_predictor(client, predictor, scenes, good):
    image = scenes[1]
    response = post(client, encode(image), text=CAPTION, threshold="0.0")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == image.size
    assert body["model"] == "mdetr_lite" and body["elapsed_ms"] > 0
    expected = predictor.predict(image, CAPTION, threshold=0.0)
    assert len(expected.scores) == predictor.model.config.num_queries
    assert_same(body["detections"], expected)
    good()


def test_default_threshold_and_top_k(client, predictor, scenes):
    image = scenes[2]
    body = post(client, encode(image), text=CAPTION).json()
    assert_same(body["detections"], predictor.predict(image, CAPTION, threshold=LIMITS.threshold))
    body = post(client, encode(image), text=CAPTION, threshold="0", top_k="2").json()
    assert_same(body["detections"], predictor.predict(image, CAPTION, threshold=0.0, top_k=2))


def test_classes_use_class_name_detection(client, predictor, scenes):
    image = scenes[0]
    response = post(client, encode(image), classes=" red circle, blue square,, ", threshold="0")
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    expected = predictor.detect(image, ["red circle", "blue square"], threshold=0.0)
    assert_same(detections, expected)
    assert [d["label"] for d in detections] == expected.labels.tolist()
    assert {d["phrase"] for d in detections} <= {"red circle", "blue square"}


def test_exif_orientation_and_image_modes(client, predictor, scenes):
    upright = scenes[3]
    # Stored turned 90 degrees counter-clockwise, tagged "rotate 90 clockwise to display" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encode(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)
    body = post(client, stored, text=CAPTION, threshold="0").json()
    assert (body["width"], body["height"]) == upright.size
    assert_same(body["detections"], predictor.predict(upright, CAPTION, threshold=0.0))
    gray = upright.convert("L")
    body = post(client, encode(gray), text=CAPTION, threshold="0").json()
    assert_same(body["detections"], predictor.predict(gray.convert("RGB"), CAPTION, threshold=0.0))


def _rgba_scene():
    """RGB noise whose left half is fully transparent black, and the same composited on white by hand."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = np.full((20, 30), 255, dtype=np.uint8)
    alpha[:, :15] = 0
    rgb_with_black = rgb.copy()
    rgb_with_black[:, :15] = 0
    composited = rgb.copy()
    composited[:, :15] = 255
    return Image.fromarray(np.dstack([rgb_with_black, alpha]), "RGBA"), composited


def test_decode_image_converts_modes_to_rgb():
    rgba, composited = _rgba_scene()
    assert np.array_equal(np.asarray(decode_image(encode(rgba), LIMITS)), composited)
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    expected = np.repeat(gray[..., None], 3, axis=2)
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit grayscale: v * 257 is v at 8 bits
    for image in (Image.fromarray(gray, "L"), wide, Image.fromarray(gray, "L").convert("P")):
        decoded = decode_image(encode(image), LIMITS)
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), expected), image.mode
    cmyk = Image.fromarray(np.dstack([np.zeros((20, 30, 3), np.uint8), gray]), "CMYK")  # K channel only
    decoded = np.asarray(decode_image(encode(cmyk, "TIFF"), LIMITS)).astype(int)
    assert np.array_equal(decoded, np.repeat(255 - gray[..., None].astype(int), 3, axis=2))


def png_header_only(width, height):
    """A PNG that declares width x height (8-bit RGB) and holds one empty IDAT chunk: a decompression bomb's
    header without its payload."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b""))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _form(image, **fields):
    """Request arguments for a multipart body with this image file and these text fields."""
    return {"files": {"image": ("upload.png", image, "image/png")}, "data": fields}


def _bad_requests(scenes):
    """(name, request arguments, expected status, words the error message must hold)."""
    png = encode(scenes[0])
    noise = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (290, 290, 3), dtype=np.uint8)))
    multipart = {"content-type": "multipart/form-data; boundary=zz"}
    return [
        ("upload over the limit", _form(noise, text=CAPTION), 413, "bytes"),
        ("chunked upload over the limit", {"content": iter([b"x" * 100_000] * 3), "headers": multipart}, 413,
         "bytes"),
        ("too many pixels", _form(encode(Image.new("RGB", (400, 300))), text=CAPTION), 413, "pixels"),
        ("decompression bomb", _form(png_header_only(40_000, 40_000), text=CAPTION), 413, "pixels"),
        ("declared huge, under PIL's own limit", _form(png_header_only(5_000, 5_000), text=CAPTION), 413,
         "25,000,000 pixels"),
        ("text too long", _form(png, text="a" * 121), 413, "characters"),
        ("empty text", _form(png, text=""), 400, "empty"),
        ("blank text", _form(png, text="  \n "), 400, "empty"),
        ("non-UTF-8 text", {"files": {"image": ("a.png", png), "text": (None, b"caf\xe9 \xff\xfe")}}, 400,
         "UTF-8"),
        ("binary text", {"files": {"image": ("a.png", png), "text": (None, b"a red\x00\x01 circle")}}, 400,
         "control"),
        ("not an image", _form(b"definitely not an image", text=CAPTION), 400, "not an image in a known"),
        ("truncated image", _form(png[: len(png) // 2], text=CAPTION), 400, "truncated"),
        ("empty image", _form(b"", text=CAPTION), 400, "missing or empty"),
        ("no image", {"files": {"text": (None, CAPTION.encode())}}, 400, "missing or empty"),
        ("unknown field", _form(png, text=CAPTION, txt="x"), 400, "unknown form field 'txt'"),
        ("neither text nor classes", _form(png), 400, "exactly one"),
        ("text and classes", _form(png, text=CAPTION, classes="cat"), 400, "exactly one"),
        ("no class names", _form(png, classes=" , ,"), 400, "no class"),
        ("threshold not a number", _form(png, text=CAPTION, threshold="high"), 400, "number"),
        ("threshold out of range", _form(png, text=CAPTION, threshold="1.5"), 400, "between 0 and 1"),
        ("threshold nan", _form(png, text=CAPTION, threshold="nan"), 400, "finite"),
        ("top_k zero", _form(png, text=CAPTION, top_k="0"), 400, "at least 1"),
        ("top_k fractional", _form(png, text=CAPTION, top_k="2.5"), 400, "integer"),
        ("field twice", {"files": [("image", ("a.png", png)), ("image", ("b.png", png))],
                         "data": {"text": CAPTION}}, 400, "more than once"),
        ("JSON body", {"json": {"text": CAPTION}}, 415, "multipart/form-data"),
        ("malformed multipart", {"content": b"garbage without any boundary", "headers": multipart}, 400,
         "malformed"),
        ("multipart without boundary", {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
         400, "boundary"),
    ]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, scenes, good):
    for name, request, status, words in _bad_requests(scenes):
        response = client.post("/v1/ground", **request)
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"], (name, response.json())
        good()


def test_text_over_the_token_limit_is_a_400(predictor, scenes):
    limits = ServeLimits(max_text_chars=5000)
    with TestClient(create_app(predictor, limits, threads=1)) as client:
        response = post(client, encode(scenes[0]), text="a " * (predictor.processor.max_tokens + 5))
        assert response.status_code == 400
        assert "tokens" in response.json()["detail"]
        assert post(client, encode(scenes[0]), text=CAPTION).status_code == 200


def test_concurrent_requests_get_their_own_results(client, predictor, scenes):
    words = ["a red circle", "the blue square", "a small green star", "a large gray triangle",
             "the yellow hexagon on the left", "a purple diamond", "a cyan circle", "a brown star"]
    jobs = [(scenes[i % len(scenes)], words[i % len(words)]) for i in range(8)]
    expected = [predictor.predict(image, text, threshold=0.0) for image, text in jobs]
    payloads = [encode(image) for image, _ in jobs]
    start = threading.Barrier(len(jobs))

    def send(i):
        start.wait()
        return post(client, payloads[i], text=jobs[i][1], threshold="0")

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, range(len(jobs))))
    for response, grounding, (_, text) in zip(responses, expected, jobs, strict=True):
        assert response.status_code == 200, response.text
        assert_same(response.json()["detections"], grounding)
        for detection in response.json()["detections"]:  # each phrase is read from this request's sentence
            assert detection["phrase"] == " ".join(text[start:end] for start, end in detection["span"])


class GatedPredictor:
    """Delegates to a predictor, but each call waits until the test opens the gate."""

    def __init__(self, predictor):
        self.inner, self.model = predictor, predictor.model
        self.entered, self.gate = threading.Event(), threading.Event()

    def predict(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        return self.inner.predict(*args, **kwargs)


def test_http_layer_answers_while_the_model_runs(predictor, scenes):
    gated = GatedPredictor(predictor)
    with TestClient(create_app(gated, LIMITS, threads=2)) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, client, encode(scenes[0]), text=CAPTION)
        assert gated.entered.wait(60)
        health = client.get("/health")  # served while the forward pass is still blocked
        assert health.status_code == 200 and not pending.done()
        rejected = post(client, b"not an image", text=CAPTION)
        assert rejected.status_code == 400 and not pending.done()
        gated.gate.set()
        assert pending.result(60).status_code == 200


def test_health_and_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "mdetr_lite"
    assert health["limits"] == {"max_upload_bytes": 200_000, "max_pixels": 90_000, "max_text_chars": 120,
                                "threshold": 0.05}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<canvas id="canvas"' in html and 'id="detections"' in html and "/v1/ground" in html
    # Self-contained: no external script, stylesheet or font.
    for external in ("<script src", "<link", "http://", "https://"):
        assert external not in html


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_pixels"):
        ServeLimits(max_pixels=0)
    with pytest.raises(ValueError, match="threshold"):
        ServeLimits(threshold=1.5)
    with pytest.raises(RequestError, match="pixels"):
        decode_image(png_header_only(100, 100), ServeLimits(max_pixels=9_999))


def test_cli_serve_builds_the_app_from_flags(tiny_checkpoint, monkeypatch, scenes):
    import mdetr.serve

    served = {}
    monkeypatch.setattr(mdetr.serve, "run_server", lambda app, **where: served.update(app=app, **where))
    assert main(["serve", str(tiny_checkpoint), "--port", "8123", "--threshold", "0.25", "--max-upload-mb",
                 "2", "--max-pixels", "5000", "--max-text-chars", "50", "--worker-threads", "1"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    with TestClient(served["app"]) as client:
        assert client.get("/health").json()["limits"] == {
            "max_upload_bytes": 2 * 2**20, "max_pixels": 5000, "max_text_chars": 50, "threshold": 0.25}
        assert post(client, encode(scenes[0]), text=CAPTION).status_code == 413  # 128 x 128 > 5000 pixels
    with pytest.raises(SystemExit):
        main(["serve", str(tiny_checkpoint), "--max-pixels", "0"])
