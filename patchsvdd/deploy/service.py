"""REST service and inspection page for one site bundle (FastAPI).

``patchsvdd serve BUNDLE`` loads the bundle once and answers

* ``GET /``: the station page for the line (one self-contained HTML file, no
  CDN): drop or pick an image, see the anomaly map over it with the regions
  above the pixel threshold outlined, the score against the threshold, the
  decision, the latest decisions, the bundle's metadata, and (with feedback on)
  mark a decision good or defective.
* ``POST /infer`` with JSON ``{"image": "<base64>"}`` (what the existing
  ``/infer`` services take) or a multipart form with a ``file`` (or ``image``)
  field; ``?map=true`` adds the anomaly map as a base64 PNG on the bundle's
  colour scale, ``?overlay=true`` the image with the map over it and the
  regions outlined. Answer: ``id`` (of the decision, for feedback), ``anomalous``
  (and ``Anomaly``, the same, for clients of those services), ``decision``,
  ``score``, ``normalized_score``, ``threshold``, ``regions``, ``bundle_version``.
* ``GET /recent``: the latest decisions, newest first, with thumbnails;
  ``GET /decisions/{id}``: one of them with its overlay.
* ``POST /feedback`` (only with ``--allow-feedback``, which needs a token):
  ``{"id": "<decision id>" | "image": "<base64>", "label": "good" | "defective"}``;
  writes a new bundle version (``deploy.feedback``) and serves it from then on.
* ``GET /health``: ``{"status": "ok"}`` once the bundle is loaded.
* ``GET /info``: the bundle's metadata (category, thresholds, bank sizes,
  source, version, history) and the service's settings; never its data.

With a token (``--token-file``) every endpoint but ``/health`` and the page
itself needs ``Authorization: Bearer <token>``. Inference runs in a pool of
``workers`` threads; a request waits for a free one. Bad input gets a 4xx with
a sentence and the service keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from patchsvdd.deploy.feedback import LABELS
from patchsvdd.deploy.inspector import to_image
from patchsvdd.deploy.station import FolderWatcher, Station, png_base64
from patchsvdd.errors import InputError

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
    from patchsvdd.deploy.station import coloured

    return png_base64(coloured(amap, low, high))


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON, read no further than ``max_bytes``; HTTPException with a sentence otherwise."""
    chunks, size = [], 0
    async for chunk in request.stream():  # read no more than the limit, whatever the headers said
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"request larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, 'body is not JSON: send {"image": "<base64 of an image file>"}') from None


def _base64_image(payload: dict, max_bytes: int) -> bytes:
    if not isinstance(payload.get("image"), str):
        raise HTTPException(400, 'JSON without an "image" string: send {"image": "<base64 of an image file>"}')
    try:
        data = base64.b64decode(payload["image"], validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, '"image" is not valid base64') from None
    if len(data) > max_bytes:
        raise HTTPException(413, f"image of {len(data)} bytes is larger than the limit of {max_bytes} bytes")
    return data


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
        payload = await _json_body(request, max_bytes)
        if not isinstance(payload, dict):
            raise HTTPException(400, 'JSON without an "image" string: send {"image": "<base64 of an image file>"}')
        data = _base64_image(payload, max_bytes)
    else:
        raise HTTPException(415, f"content type {kind!r}: send application/json or multipart/form-data")
    if len(data) > max_bytes:
        raise HTTPException(413, f"image of {len(data)} bytes is larger than the limit of {max_bytes} bytes")
    return data


PAGE = Path(__file__).with_name("station.html")


def read_token(path: str | Path) -> str:
    """The bearer token in the file ``path`` (its first line); InputError naming the file otherwise."""
    path = Path(path)
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the token file ({exc})") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise InputError(f"{path}: the token must be at least 16 characters on the first line")
    return token


@dataclass
class Service:
    """What every endpoint shares: the station (a loaded bundle), the body limit, the worker pool, the token, the
    camera-folder watcher."""

    station: Station
    max_bytes: int
    limiter: anyio.CapacityLimiter
    token: str | None = None
    watcher: FolderWatcher | None = None

    def authorised(self, request: Request) -> None:
        """A dependency: 401 unless the request carries the bearer token (when the service has one)."""
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise HTTPException(
                401,
                "this service needs its token: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def guarded(self) -> list[Any]:
        return [Depends(self.authorised)]


def open_router() -> APIRouter:
    """The page and /health: no token."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @router.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return router


def inspection_router(service: Service) -> APIRouter:
    """/info (the bundle and the service) and /infer (a decision on one image)."""
    router = APIRouter(dependencies=service.guarded())
    station = service.station

    @router.get("/info")
    def bundle_info() -> dict[str, Any]:
        return {
            **station.info,
            "bundle_version": station.version,
            "service": {
                "feedback": station.allow_feedback,
                "token": service.token is not None,
                "recent": station.recent.maxlen,
                "watch": None if service.watcher is None else str(service.watcher.folder),
                "search": station.inspector.search,
            },
        }

    @router.post("/infer")
    async def infer(
        request: Request,
        map: bool = Query(False, description="add the anomaly map as a base64 PNG"),
        overlay: bool = Query(False, description="add the image with the map over it, regions outlined"),
    ):
        data = await _image_bytes(request, service.max_bytes)
        try:
            image = decode_image(data)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        decision, result = await anyio.to_thread.run_sync(station.inspect, image, limiter=service.limiter)
        answer: dict[str, Any] = {
            "id": decision.id,
            "anomalous": result.anomalous,
            "Anomaly": result.anomalous,
            "decision": "defective" if result.anomalous else "good",
            "score": result.score,
            "normalized_score": result.normalized_score,
            "threshold": decision.threshold,
            "regions": decision.regions,
            "bundle_version": decision.bundle_version,
        }
        if map:
            pixel = station.inspector.pixel_threshold
            answer["map"] = map_png(result.map, pixel.low, pixel.high)
        if overlay:
            answer["overlay"] = decision.pictures()[0]
        return answer

    return router


def history_router(service: Service) -> APIRouter:
    """/recent (the latest decisions) and /decisions/{id} (one, with its overlay)."""
    router = APIRouter(dependencies=service.guarded())
    station = service.station

    @router.get("/recent")
    def recent() -> dict[str, Any]:
        return {
            "decisions": [d.summary() for d in station.decisions()],
            "keep": station.recent.maxlen,
            "watch_errors": [] if service.watcher is None else list(service.watcher.errors),
        }

    @router.get("/decisions/{decision_id}")
    def decision(decision_id: str) -> dict[str, Any]:
        found = station.find(decision_id)
        if found is None:
            raise HTTPException(
                404, f"no recent decision {decision_id!r} (the service keeps the last {station.recent.maxlen})"
            )
        return found.summary(with_overlay=True)

    return router


def feedback_router(service: Service) -> APIRouter:
    """/feedback: an operator's label for a recent decision or an image, into a new bundle version."""
    router = APIRouter(dependencies=service.guarded())
    station = service.station

    @router.post("/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        if not station.allow_feedback:
            raise HTTPException(403, "feedback is off: start the service with --allow-feedback and --token-file")
        payload = await _json_body(request, service.max_bytes)
        if not isinstance(payload, dict) or payload.get("label") not in LABELS:
            raise HTTPException(400, f'send {{"id" or "image", "label": {" or ".join(map(repr, LABELS))}}}')
        found = None
        if isinstance(payload.get("id"), str):
            found = station.find(payload["id"])
            if found is None:
                raise HTTPException(404, f"no recent decision {payload['id']!r}: send the image instead")
            image, request_name = found.image, f"feedback on decision {found.id} ({found.source})"
        elif "image" in payload:
            try:
                image = decode_image(_base64_image(payload, service.max_bytes))
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            request_name = "feedback with an image"
        else:
            raise HTTPException(400, 'feedback needs the "id" of a recent decision or an "image"')
        client = request.client.host if request.client else "?"
        try:
            change = await anyio.to_thread.run_sync(
                station.teach, image, payload["label"], f"POST /feedback from {client}: {request_name}"
            )
        except InputError as exc:
            raise HTTPException(409, str(exc)) from None
        if found is not None:
            found.feedback = payload["label"]  # shown with the decision in /recent
        after, _ = await anyio.to_thread.run_sync(station.inspect, image, "feedback check", limiter=service.limiter)
        return {
            "version": change.version,
            "label": change.label,
            "note": change.note,
            "threshold": change.threshold.value,
            "bank_rows": change.bank_rows,
            "decision": after.summary(with_overlay=True),
        }

    return router


def create_app(
    station: Station,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    token: str | None = None,
    watch: str | Path | None = None,
    watch_interval: float = 1.0,
) -> FastAPI:
    """The service and page for ``station`` (a loaded bundle), one router per concern; ``token``: the bearer token
    every endpoint but /health and / asks for; ``watch``: a camera folder to inspect new images from."""
    if max_bytes < 1 or workers < 1:
        raise ValueError(f"max_bytes={max_bytes}, workers={workers}: both at least 1")
    if station.allow_feedback and not token:
        raise InputError("feedback changes the bundle: --allow-feedback needs --token-file")
    watcher = FolderWatcher(station, watch, watch_interval) if watch is not None else None
    service = Service(station, max_bytes, anyio.CapacityLimiter(workers), token, watcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()

    info = station.info
    app = FastAPI(
        title="patchsvdd inspector",
        version=str(info.get("version", "")),
        description=f"Patch SVDD anomaly detection for '{info.get('category', '?')}' images.",
        lifespan=lifespan,
    )
    for router in (open_router(), inspection_router(service), history_router(service), feedback_router(service)):
        app.include_router(router)
    return app


def serve(
    bundle: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    token_file: str | None = None,
    allow_feedback: bool = False,
    watch: str | None = None,
    recent: int = 24,
) -> None:
    """Load ``bundle`` once and serve it with uvicorn until stopped."""
    import uvicorn

    token = read_token(token_file) if token_file is not None else None
    if allow_feedback and token is None:
        raise InputError("feedback changes the bundle: --allow-feedback needs --token-file")
    if watch is not None and not Path(watch).is_dir():
        raise InputError(f"--watch {watch}: no such folder")
    station = Station(bundle, device=device, recent=recent, allow_feedback=allow_feedback)
    app = create_app(station, max_bytes=max_bytes, workers=workers, token=token, watch=watch)
    uvicorn.run(app, host=host, port=port, log_level="info")
