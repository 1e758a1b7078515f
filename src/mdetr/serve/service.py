"""Run grounding requests on one predictor from a thread pool, so the HTTP event loop never waits on them."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from mdetr.inference.postprocess import Grounding
from mdetr.inference.predictor import Predictor
from mdetr.serve.inputs import GroundingQuery, RequestError, ServeLimits, decode_image


class GroundingService:
    """Decodes uploads and runs the predictor on ``threads`` worker threads.

    Images are decoded in parallel, but the predictor runs one request at a time under a lock: the model's
    tokenizer keeps per-call state and is not safe to share between threads, and on a few CPU cores
    interleaved forward passes would only compete for them. Every request carries its own inputs and gets
    its own result object back, so concurrent requests cannot see each other's detections.
    """

    def __init__(self, predictor: Predictor, limits: ServeLimits, *, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.predictor = predictor
        self.limits = limits
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mdetr-serve")

    async def ground(self, query: GroundingQuery) -> dict:
        """The response body for one query (see :func:`response_body`), computed on a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._ground, query)

    def _ground(self, query: GroundingQuery) -> dict:
        image = decode_image(query.image, self.limits)
        with self._lock:
            try:
                if query.classes is not None:
                    grounding = self.predictor.detect(image, list(query.classes), threshold=query.threshold,
                                                      top_k=query.top_k)
                else:
                    grounding = self.predictor.predict(image, query.text, threshold=query.threshold,
                                                       top_k=query.top_k)
            except ValueError as err:  # the predictor's input checks, e.g. a caption over the token limit
                raise RequestError(400, str(err)) from None
        return response_body(image.width, image.height, grounding)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def response_body(width: int, height: int, grounding: Grounding) -> dict:
    """``{"width", "height", "detections"}``: per box, best first, ``box`` pixel xyxy in the upright image,
    ``score``, ``phrase`` and ``span`` (its character ranges in the text; for class names, the range of the
    name in the prompt the server built) and, for class names, ``label`` (the index of the name)."""
    detections = []
    for record in grounding.to_json():
        detection = {"box": record["box_xyxy"], "score": record["score"], "phrase": record["phrase"],
                     "span": record["spans"]}
        if "label" in record:
            detection["label"] = record["label"]
        detections.append(detection)
    return {"width": width, "height": height, "detections": detections}
