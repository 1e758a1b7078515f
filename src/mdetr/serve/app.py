"""The web demo's HTTP application: ``POST /v1/ground``, ``GET /health`` and the page at ``GET /``.

``create_app`` takes a ready :class:`~mdetr.inference.predictor.Predictor`, so tests drive the whole API
in-process with FastAPI's ``TestClient``; ``mdetr serve`` builds the predictor from a checkpoint and runs the
app under uvicorn.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from mdetr.inference.predictor import Predictor
from mdetr.serve.inputs import FORM_FIELDS, RequestError, ServeLimits, parse_query, read_form
from mdetr.serve.service import GroundingService

# The multipart body is parsed by hand (raw bytes, size limit while streaming), so describe it for /docs.
_GROUND_REQUEST = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG, WebP, BMP, GIF or TIFF"},
        "text": {"type": "string", "description": "the sentence to ground (or give classes)"},
        "classes": {"type": "string", "description": "comma-separated class names to detect (or give text)"},
        "threshold": {"type": "number", "description": "keep boxes scoring above this (0..1)"},
        "top_k": {"type": "integer", "description": "keep at most this many boxes"},
    }}}}}}


def model_name(predictor: Predictor) -> str:
    """The architecture the predictor's model was built as, e.g. ``mdetr_lite``."""
    config = getattr(predictor.model, "config", None)
    return str(getattr(config, "arch", None) or type(predictor.model).__name__)


def page_html() -> str:
    """The demo page: one self-contained HTML file (inline CSS and JavaScript, nothing fetched elsewhere)."""
    return files("mdetr.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, limits: ServeLimits | None = None, *, name: str | None = None,
               threads: int = 2) -> FastAPI:
    """The FastAPI app serving ``predictor`` under ``limits``, running inference on ``threads`` threads."""
    limits = limits or ServeLimits()
    name = name or model_name(predictor)
    service = GroundingService(predictor, limits, threads=threads)
    page = page_html()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="mdetr grounding", summary="Boxes for the phrases of a sentence.", lifespan=lifespan)
    app.state.service = service

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        """Liveness, the model's name and the request limits (the page reads them)."""
        return {"status": "ok", "model": name, "fields": list(FORM_FIELDS),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                           "max_text_chars": limits.max_text_chars, "threshold": limits.threshold}}

    @app.post("/v1/ground", openapi_extra=_GROUND_REQUEST)
    async def ground(request: Request) -> JSONResponse:
        """Ground a sentence (``text``) or detect class names (``classes``) in an uploaded ``image``.

        Returns ``width``/``height`` of the upright image, ``detections`` best first (``box`` pixel xyxy,
        ``score``, ``phrase``, ``span`` character ranges, ``label`` for class names), ``model`` and
        ``elapsed_ms`` (server time for this request, queueing included). Bad input gets a 4xx with
        ``detail``.
        """
        start = time.perf_counter()
        try:
            parts = await read_form(request.headers.get("content-type", ""),
                                    request.headers.get("content-length"), request.stream(), limits)
            body = await service.ground(parse_query(parts, limits))
        except RequestError as err:
            return JSONResponse({"detail": err.message}, status_code=err.status)
        body["model"] = name
        body["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 1)
        return JSONResponse(body)

    return app
