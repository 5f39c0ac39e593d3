"""The REST service as a real process on loopback, talked to with a real HTTP client."""

from __future__ import annotations

import base64
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.federated.local import Processes, wait_for
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.probes import free_port, service_healthy

pytestmark = pytest.mark.slow
MAX_BYTES = 400_000


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    data = load_category(index_category(tiny_root, "fabric"))
    export_bundle(PatchSVDD(emb_dim=16), data, folder / "bundle", bank_fraction=0.5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Processes() as processes:
        node = processes.start(
            "serve",
            [
                sys.executable,
                "-m",
                "patchsvdd.cli.main",
                "serve",
                str(folder / "bundle"),
                "--port",
                str(port),
                "--max-bytes",
                str(MAX_BYTES),
                "--workers",
                "2",
            ],
            folder / "serve.log",
        )
        wait_for(lambda: service_healthy(url), 120, "the service to answer /health", [node])
        yield url, folder / "bundle", data, node


def test_infer_json_and_multipart_give_the_inspectors_answer(service) -> None:
    url, bundle, data, _ = service
    expected = load_bundle(bundle, device="cpu").inspect(data.test_images[3])
    png = _png(data.test_images[3])
    by_json = httpx.post(f"{url}/infer", json={"image": base64.b64encode(png).decode()}, timeout=60).json()
    by_form = httpx.post(f"{url}/infer?map=true", files={"file": ("x.png", png, "image/png")}, timeout=60).json()
    for answer in (by_json, by_form):
        assert answer["score"] == pytest.approx(expected.score, rel=1e-5)
        assert answer["anomalous"] is answer["Anomaly"] is expected.anomalous
        assert answer["normalized_score"] == pytest.approx(expected.normalized_score, abs=1e-6)
    assert "map" not in by_json
    shown = Image.open(io.BytesIO(base64.b64decode(by_form["map"])))
    assert shown.size == (256, 256) and shown.mode == "RGB"
    info = httpx.get(f"{url}/info", timeout=10)
    assert info.json()["category"] == "fabric" and by_json["threshold"] == info.json()["image_threshold"]["value"]
    assert len(info.content) < 10_000  # metadata only: the banks alone are megabytes
    assert httpx.get(f"{url}/docs", timeout=10).status_code == 200  # OpenAPI docs


@pytest.mark.parametrize(
    "request_kwargs, status, text",
    [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "body is not JSON"),
        (dict(json={"picture": "x"}), 400, 'without an "image" string'),
        (dict(json={"image": "***"}), 400, "not valid base64"),
        (dict(json={"image": base64.b64encode(b"hello, not an image").decode()}), 400, "not an image"),
        (dict(json={"image": ""}), 400, "image is empty"),
        (dict(files={"other": ("x.txt", b"abc", "text/plain")}), 400, "without a file field"),
        (
            dict(content=b"x" * (MAX_BYTES + 1), headers={"content-type": "application/json"}),
            413,
            "larger than the limit",
        ),
        (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "content type 'text/plain'"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_sentence_and_the_service_goes_on(service, request_kwargs, status, text) -> None:
    url, _, data, node = service
    answer = httpx.post(f"{url}/infer", timeout=30, **request_kwargs)
    assert answer.status_code == status and text in answer.json()["detail"]
    assert node.process.poll() is None and service_healthy(url)


def test_concurrent_requests_all_answered_alike(service) -> None:
    url, bundle, data, _ = service
    pngs = [_png(image) for image in data.test_images[:4]]
    expected = [load_bundle(bundle, device="cpu").inspect(image).score for image in data.test_images[:4]]

    def ask(i: int) -> float:
        return httpx.post(f"{url}/infer", files={"image": ("x.png", pngs[i % 4], "image/png")}, timeout=120).json()[
            "score"
        ]

    with ThreadPoolExecutor(8) as pool:
        scores = list(pool.map(ask, range(16)))
    assert scores == pytest.approx([expected[i % 4] for i in range(16)], rel=1e-5)
