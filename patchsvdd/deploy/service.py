"""REST service for one site bundle (FastAPI): ``POST /infer``, ``GET /health``, ``GET /info``.

``patchsvdd serve BUNDLE`` loads the bundle once and answers

* ``POST /infer`` with JSON ``{"image": "<base64>"}`` (what the existing
  ``/infer`` services take) or a multipart form with a ``file`` (or ``image``)
  field; ``?map=true`` adds the anomaly map as a base64 PNG on the bundle's
  colour scale. Answer: ``anomalous`` (and ``Anomaly``, the same, for clients
  of those services), ``score``, ``normalized_score``, ``threshold``.
* ``GET /health``: ``{"status": "ok"}`` once the bundle is loaded.
* ``GET /info``: the bundle's metadata (category, thresholds, bank sizes,
  source, version); never its data.

Inference runs in a pool of ``workers`` threads; a request waits for a free
one. Bad input gets a 4xx with a sentence and the service keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from PIL import Image, UnidentifiedImageError

from patchsvdd.deploy.inspector import Inspector, to_image

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_WORKERS = 2
IMAGE_FIELDS = ("file", "image")


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Bytes of an image file -> uint8 (256,256,3) as training reads it; ValueError with a sentence otherwise."""
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_image(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{what} is not an image Pillow can read ({type(exc).__name__})") from exc


def map_png(amap: np.ndarray, low: float, high: float) -> str:
    """An anomaly map (H,W) as a base64 PNG, coloured on the fixed scale ``low``..``high`` (``plots.CMAP``)."""
    from matplotlib import colormaps

    from patchsvdd.evaluation.plots import CMAP

    scaled = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
    rgb = (colormaps[CMAP](scaled)[..., :3] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image's bytes from a JSON or multipart request; HTTPException with a sentence otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request of {declared} bytes is larger than the limit of {max_bytes} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4, max_part_size=max_bytes)
        upload = next((form[name] for name in IMAGE_FIELDS if name in form and hasattr(form[name], "read")), None)
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, f"multipart request without a file field ({' or '.join(IMAGE_FIELDS)})")
        data = await upload.read()
    elif kind in ("application/json", ""):
        chunks, size = [], 0
        async for chunk in request.stream():  # read no more than the limit, whatever the headers said
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, f"request larger than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, 'body is not JSON: send {"image": "<base64 of an image file>"}') from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise HTTPException(400, 'JSON without an "image" string: send {"image": "<base64 of an image file>"}')
        try:
            data = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, '"image" is not valid base64') from None
    else:
        raise HTTPException(415, f"content type {kind!r}: send application/json or multipart/form-data")
    if len(data) > max_bytes:
        raise HTTPException(413, f"image of {len(data)} bytes is larger than the limit of {max_bytes} bytes")
    return data


def create_app(inspector: Inspector, max_bytes: int = DEFAULT_MAX_BYTES, workers: int = DEFAULT_WORKERS) -> FastAPI:
    """The service for ``inspector`` (a loaded bundle)."""
    if max_bytes < 1 or workers < 1:
        raise ValueError(f"max_bytes={max_bytes}, workers={workers}: both at least 1")
    info = inspector.bundle.info
    app = FastAPI(
        title="patchsvdd inspector",
        version=str(info.get("version", "")),
        description=f"Patch SVDD anomaly detection for '{info.get('category', '?')}' images.",
    )
    limiter = anyio.CapacityLimiter(workers)
    pixel = inspector.pixel_threshold

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def bundle_info() -> dict[str, Any]:
        return dict(info)

    @app.post("/infer")
    async def infer(request: Request, map: bool = Query(False, description="add the anomaly map as a base64 PNG")):
        data = await _image_bytes(request, max_bytes)
        try:
            image = decode_image(data)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        result = await anyio.to_thread.run_sync(inspector.inspect, image, limiter=limiter)
        answer: dict[str, Any] = {
            "anomalous": result.anomalous,
            "Anomaly": result.anomalous,
            "score": result.score,
            "normalized_score": result.normalized_score,
            "threshold": inspector.image_threshold.value,
        }
        if map:
            answer["map"] = map_png(result.map, pixel.low, pixel.high)
        return answer

    return app


def serve(
    bundle: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
) -> None:
    """Load ``bundle`` once and serve it with uvicorn until stopped."""
    import uvicorn

    from patchsvdd.deploy.inspector import load_bundle

    app = create_app(load_bundle(bundle, device=device), max_bytes=max_bytes, workers=workers)
    uvicorn.run(app, host=host, port=port, log_level="info")
