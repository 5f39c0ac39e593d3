"""The inspection station behind ``patchsvdd serve``: the loaded bundle, the latest decisions, the pictures
the page shows, operator feedback and a camera folder that is watched for new images.

No HTTP here (``deploy.service`` is the web layer); everything is safe to call
from several threads: inspections share the current inspector, a change
(feedback) takes a write lock, writes a new bundle version and swaps in an
inspector of the new version.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from patchsvdd.data.mvtec import IMAGE_SUFFIXES
from patchsvdd.deploy.feedback import Change, teach
from patchsvdd.deploy.inspector import Inspector, Result, load_bundle, to_image
from patchsvdd.deploy.versions import version_number

DEFAULT_RECENT = 24
THUMBNAIL = 96
OVERLAY_ALPHA = 0.55


def png_base64(rgb: np.ndarray) -> str:
    """A uint8 image (H,W,3) as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def coloured(amap: np.ndarray, low: float, high: float) -> np.ndarray:
    """An anomaly map (H,W) coloured on the fixed scale ``low``..``high`` (``plots.CMAP``): uint8 (H,W,3)."""
    from matplotlib import colormaps

    from patchsvdd.evaluation.plots import CMAP

    scaled = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
    return (colormaps[CMAP](scaled)[..., :3] * 255).astype(np.uint8)


def regions(amap: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """The pixels at or above ``threshold`` (H,W) bool, and how many connected regions they make."""
    above = amap >= threshold
    _, count = ndimage.label(above)
    return above, int(count)


def overlay(image: np.ndarray, amap: np.ndarray, low: float, threshold: float, high: float) -> np.ndarray:
    """The image (H,W,3) uint8 with the map coloured over it where it rises above ``low`` (more opaque as it
    rises) and the regions at or above the pixel ``threshold`` outlined in white on black: (H,W,3) uint8."""
    colours = coloured(amap, low, high).astype(np.float32)
    weight = OVERLAY_ALPHA * np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)[..., None]
    picture = image.astype(np.float32) * (1 - weight) + colours * weight
    above, count = regions(amap, threshold)
    if count:
        edge = above & ~ndimage.binary_erosion(above, iterations=1, border_value=0)
        halo = ndimage.binary_dilation(edge, iterations=1) & ~edge
        picture[halo] = 0.0
        picture[edge] = 255.0
    return np.clip(picture, 0, 255).astype(np.uint8)


def thumbnail(picture: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """A small copy (size,size,3) of a picture."""
    return np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.BILINEAR))


@dataclass
class Decision:
    """One inspected image as the station remembers it: what was decided, the image and its map (for
    feedback by ``id`` and for the pictures, drawn when first asked for: an API client that only wants the
    decision never pays for them; neither array is ever sent back)."""

    id: str
    when: float
    source: str
    score: float
    normalized_score: float
    anomalous: bool
    threshold: float
    regions: int
    bundle_version: int
    pixel_scale: tuple[float, float, float]  # the pixel threshold's (low, value, high) the overlay is drawn on
    image: np.ndarray = field(repr=False)  # (256,256,3) uint8
    map: np.ndarray = field(repr=False)  # (256,256) float32
    feedback: str | None = None
    _pictures: tuple[str, str] | None = field(default=None, repr=False)

    def pictures(self) -> tuple[str, str]:
        """(overlay (256,256), thumbnail (THUMBNAIL,THUMBNAIL)) as base64 PNGs, drawn once."""
        if self._pictures is None:
            low, value, high = self.pixel_scale
            picture = overlay(self.image, self.map, low, value, high)
            self._pictures = png_base64(picture), png_base64(thumbnail(picture))
        return self._pictures

    def summary(self, with_overlay: bool = False) -> dict[str, Any]:
        drawn, small = self.pictures()
        answer = {
            "id": self.id,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.when)),
            "source": self.source,
            "score": self.score,
            "normalized_score": self.normalized_score,
            "anomalous": self.anomalous,
            "decision": "defective" if self.anomalous else "good",
            "threshold": self.threshold,
            "regions": self.regions,
            "bundle_version": self.bundle_version,
            "feedback": self.feedback,
            "thumbnail": small,
        }
        if with_overlay:
            answer["overlay"] = drawn
        return answer


class Station:
    """The bundle at ``bundle_path`` being served: inspect, remember the last ``recent`` decisions, take
    feedback (when ``allow_feedback``), follow a camera folder (``watch``)."""

    def __init__(
        self,
        bundle_path: str | Path,
        device: str = "auto",
        recent: int = DEFAULT_RECENT,
        allow_feedback: bool = False,
        inspector: Inspector | None = None,
    ) -> None:
        if recent < 1:
            raise ValueError(f"recent={recent}: keep at least one decision")
        self.bundle_path = Path(bundle_path)
        self.device = device
        self.allow_feedback = allow_feedback
        self.inspector = inspector if inspector is not None else load_bundle(bundle_path, device=device)
        self.recent: deque[Decision] = deque(maxlen=recent)
        self._recent_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.watcher: FolderWatcher | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self.inspector.bundle.info

    @property
    def version(self) -> int:
        return version_number(self.info)

    def inspect(self, image: np.ndarray, source: str = "upload") -> tuple[Decision, Result]:
        """Inspect a uint8 image (256,256,3), remember the decision; (decision, the inspector's result)."""
        inspector = self.inspector  # one version for the whole answer, even if feedback swaps it meanwhile
        result = inspector.inspect(image)
        pixel = inspector.pixel_threshold
        _, count = regions(result.map, pixel.value)
        decision = Decision(
            id=uuid.uuid4().hex[:12],
            when=time.time(),
            source=source,
            score=result.score,
            normalized_score=result.normalized_score,
            anomalous=result.anomalous,
            threshold=inspector.image_threshold.value,
            regions=count,
            bundle_version=version_number(inspector.bundle.info),
            pixel_scale=(pixel.low, pixel.value, pixel.high),
            image=image,
            map=result.map,
        )
        with self._recent_lock:
            self.recent.appendleft(decision)
        return decision, result

    def decisions(self) -> list[Decision]:
        """The remembered decisions, newest first."""
        with self._recent_lock:
            return list(self.recent)

    def find(self, decision_id: str) -> Decision | None:
        with self._recent_lock:
            return next((d for d in self.recent if d.id == decision_id), None)

    def teach(self, image: np.ndarray, label: str, request: str) -> Change:
        """Write the feedback as a new bundle version and serve that version from now on."""
        with self._write_lock:
            change = teach(self.bundle_path, image[None], label, request=request, device=str(self.inspector.device))
            self.inspector = load_bundle(self.bundle_path, device=self.device)
        return change

    def reload(self) -> None:
        """Serve the bundle's current version again (after a rollback from the command line)."""
        with self._write_lock:
            self.inspector = load_bundle(self.bundle_path, device=self.device)


class FolderWatcher:
    """Polls ``folder`` every ``interval`` seconds and inspects each image file that appears or changes,
    once it has stopped growing; the decisions go to the station's recent list (source 'folder: NAME')."""

    def __init__(self, station: Station, folder: str | Path, interval: float = 1.0) -> None:
        self.station, self.folder, self.interval = station, Path(folder), interval
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder}: no such folder to watch")
        self.seen: dict[str, tuple[int, int]] = {}
        self.errors: deque[str] = deque(maxlen=20)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="folder-watcher", daemon=True)
        self._pending: dict[str, tuple[int, int]] = {}

    def start(self) -> FolderWatcher:
        self.station.watcher = self
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def poll(self) -> int:
        """One look at the folder; returns how many images it inspected."""
        done = 0
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            stat = path.stat()
            mark = (stat.st_mtime_ns, stat.st_size)
            if self.seen.get(path.name) == mark:
                continue
            if self._pending.get(path.name) != mark:  # first sight, or still being written: look again
                self._pending[path.name] = mark
                continue
            self.seen[path.name] = mark
            del self._pending[path.name]
            try:
                self.station.inspect(to_image(path), source=f"folder: {path.name}")
                done += 1
            except Exception as exc:  # a bad file is reported, the watch goes on
                self.errors.appendleft(f"{path}: {exc}")
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except OSError as exc:
                self.errors.appendleft(f"{self.folder}: {exc}")
