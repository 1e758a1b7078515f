"""The web demo: an HTTP JSON API for grounding and a page to try it (``mdetr serve``).

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart): ``pip install "mdetr[serve]"``.
"""

from mdetr.serve.app import create_app
from mdetr.serve.inputs import RequestError, ServeLimits, decode_image
from mdetr.serve.server import ThreadedServer, run_server

__all__ = ["RequestError", "ServeLimits", "ThreadedServer", "create_app", "decode_image", "run_server"]
