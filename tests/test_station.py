"""The inspection station: ``patchsvdd serve`` as a real process on loopback with a token, feedback and a
camera folder, talked to over HTTP; and its page driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from patchsvdd.cli.main import main as cli
from patchsvdd.data.mvtec import CategoryData, index_category, load_category
from patchsvdd.deploy.bundle import read_bundle
from patchsvdd.deploy.export import export_bundle
from patchsvdd.deploy.inspector import load_bundle
from patchsvdd.deploy.versions import CURRENT_FILE, current_folder
from patchsvdd.federated.local import Node, Processes, wait_for
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.probes import free_port, service_healthy

pytestmark = pytest.mark.slow
TOKEN = "station-test-token-0123456789"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(_png(array)).decode()


def start_station(processes: Processes, bundle: Path, folder: Path, *options: str) -> tuple[str, Node]:
    """``patchsvdd serve bundle options...`` on a free loopback port; (its URL, its node) once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "patchsvdd.cli.main", "serve", str(bundle), "--port", str(port), *options]
    node = processes.start("serve", command, folder / f"serve-{port}.log")
    wait_for(lambda: service_healthy(url), 120, "the station to answer /health", [node])
    return url, node


def flagged_image(bundle: Path, data: CategoryData) -> np.ndarray:
    """The highest-scoring test image the bundle calls anomalous (what an operator would call a false alarm)."""
    inspector = load_bundle(bundle, device="cpu")
    maps = inspector.maps(data.test_images)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    assert (scores >= inspector.image_threshold.value).any()
    return data.test_images[int(np.argmax(scores))]


@pytest.fixture(scope="module")
def exported(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CategoryData]:
    folder = tmp_path_factory.mktemp("station-export")
    torch.manual_seed(0)
    data = load_category(index_category(tiny_root, "fabric"))
    export_bundle(PatchSVDD(emb_dim=16), data, folder / "bundle", bank_fraction=0.5)
    return folder / "bundle", data


@pytest.fixture(scope="module")
def station(exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, CategoryData, Path]]:
    folder = tmp_path_factory.mktemp("station")
    shutil.copytree(exported[0], folder / "bundle")
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "camera").mkdir()
    with Processes() as processes:
        url, _ = start_station(
            processes,
            folder / "bundle",
            folder,
            "--token-file",
            str(folder / "token"),
            "--allow-feedback",
            "--watch",
            str(folder / "camera"),
            "--recent",
            "5",
        )
        yield url, folder / "bundle", exported[1], folder / "camera"


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_the_token_only_health_and_the_page_answer(station) -> None:
    url, bundle, data, _ = station
    page = httpx.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "Inspection station" in page.text and "http://" not in page.text.lower()
    assert "fabric" not in page.text  # the page holds no data: it asks the API, with the token
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    image = _b64(data.test_images[0])
    calls = [
        ("GET", "/info", None),
        ("GET", "/recent", None),
        ("POST", "/infer", {"image": image}),
        ("POST", "/feedback", {"image": image, "label": "good"}),
    ]
    for headers in ({}, _auth("wrong-token-wrong-token"), {"Authorization": TOKEN}):
        for method, path, body in calls:
            answer = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert answer.status_code == 401, (path, headers)
            assert "token" in answer.json()["detail"]
    assert not (bundle / CURRENT_FILE).exists()  # nothing changed


def test_a_false_alarm_marked_good_then_decides_good(station) -> None:
    url, bundle, data, _ = station
    image = flagged_image(bundle, data)
    first = httpx.post(f"{url}/infer?overlay=true", json={"image": _b64(image)}, headers=_auth(), timeout=60).json()
    assert first["anomalous"] and first["decision"] == "defective" and first["bundle_version"] == 1
    picture = Image.open(io.BytesIO(base64.b64decode(first["overlay"])))
    assert picture.size == (256, 256) and first["regions"] >= 1
    rows_before = read_bundle(bundle).info["bank_rows"]

    taught = httpx.post(f"{url}/feedback", json={"id": first["id"], "label": "good"}, headers=_auth(), timeout=120)
    assert taught.status_code == 200, taught.text
    answer = taught.json()
    assert answer["version"] == 2 and answer["decision"]["decision"] == "good"
    assert answer["decision"]["score"] < answer["threshold"]
    again = httpx.post(f"{url}/infer", json={"image": _b64(image)}, headers=_auth(), timeout=60).json()
    assert not again["anomalous"] and again["bundle_version"] == 2
    on_disk = read_bundle(bundle)
    assert (bundle / CURRENT_FILE).read_text().strip() == "versions/0002"
    grid = {"64": 13 * 13, "32": 57 * 57}  # the image's patches joined the bank: one more row per grid position
    assert on_disk.info["bank_rows"] == {k: rows_before[k] + grid[k] for k in rows_before}
    assert "POST /feedback from 127.0.0.1" in on_disk.info["history"][-1]["request"]
    info = httpx.get(f"{url}/info", headers=_auth(), timeout=10).json()
    assert info["bundle_version"] == 2 and info["service"]["feedback"] is True
    recent = httpx.get(f"{url}/recent", headers=_auth(), timeout=10).json()["decisions"]
    assert recent[1]["source"] == "feedback check" and any(d["feedback"] == "good" for d in recent)


def test_defective_feedback_by_image_moves_the_threshold(station) -> None:
    url, bundle, data, _ = station
    good = data.test_images[data.test_labels == 0][0]
    before = httpx.get(f"{url}/info", headers=_auth(), timeout=10).json()
    answer = httpx.post(
        f"{url}/feedback", json={"image": _b64(good), "label": "defective"}, headers=_auth(), timeout=120
    ).json()
    assert answer["version"] == before["bundle_version"] + 1
    after = httpx.get(f"{url}/info", headers=_auth(), timeout=10).json()
    assert after["image_threshold"]["value"] == answer["threshold"]
    assert after["n_confirmed_defective"] == 1 and "recalibrated" in after["calibration_note"]
    assert list((current_folder(bundle) / "feedback").glob("defective-*.png"))


@pytest.mark.parametrize(
    "body, status, text",
    [
        ({"image": "x", "label": "perhaps"}, 400, '"label"'),
        ({"label": "good"}, 400, "needs the"),
        ({"id": "000000000000", "label": "good"}, 404, "no recent decision"),
        ({"image": "***", "label": "good"}, 400, "not valid base64"),
        ({"image": base64.b64encode(b"not an image").decode(), "label": "good"}, 400, "not an image"),
        ([1, 2], 400, '"label"'),
    ],
)
def test_bad_feedback_gets_a_4xx_and_changes_nothing(station, body, status, text) -> None:
    url, bundle, _, _ = station
    before = (bundle / CURRENT_FILE).read_text() if (bundle / CURRENT_FILE).exists() else None
    answer = httpx.post(f"{url}/feedback", json=body, headers=_auth(), timeout=30)
    assert answer.status_code == status and text in answer.json()["detail"]
    after = (bundle / CURRENT_FILE).read_text() if (bundle / CURRENT_FILE).exists() else None
    assert before == after and service_healthy(url)


def test_the_camera_folder_is_watched(station) -> None:
    url, _, data, camera = station
    (camera / "part-0001.png.part").write_bytes(_png(data.test_images[1]))  # still being copied: not an image
    (camera / "part-0001.png.part").rename(camera / "part-0001.png")

    def seen() -> bool:
        decisions = httpx.get(f"{url}/recent", headers=_auth(), timeout=10).json()["decisions"]
        return any(d["source"] == "folder: part-0001.png" for d in decisions)

    wait_for(seen, 30, "the camera folder's image among the recent decisions")
    (camera / "notes.txt").write_text("not an image")
    recent = httpx.get(f"{url}/recent", headers=_auth(), timeout=10).json()
    assert len(recent["decisions"]) <= recent["keep"] == 5  # --recent 5: kept in memory, newest first
    found = next(d for d in recent["decisions"] if d["source"] == "folder: part-0001.png")
    full = httpx.get(f"{url}/decisions/{found['id']}", headers=_auth(), timeout=10).json()
    assert "overlay" in full and "image" not in full


def test_feedback_needs_allow_feedback_and_a_token(exported, tmp_path: Path, capsys) -> None:
    bundle, data = exported
    assert cli(["serve", str(bundle), "--allow-feedback"]) == 2
    assert "--allow-feedback needs --token-file" in capsys.readouterr().err
    (tmp_path / "short").write_text("abc\n")
    assert cli(["serve", str(bundle), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    with Processes() as processes:
        url, _ = start_station(processes, bundle, tmp_path)  # no token, no feedback: the open service as before
        image = _b64(data.test_images[0])
        assert httpx.post(f"{url}/infer", json={"image": image}, timeout=60).status_code == 200
        refused = httpx.post(f"{url}/feedback", json={"image": image, "label": "good"}, timeout=30)
        assert refused.status_code == 403 and "--allow-feedback" in refused.json()["detail"]
    assert not (bundle / CURRENT_FILE).exists()


def test_bundle_commands_add_good_history_rollback(exported, tmp_path: Path, capsys) -> None:
    bundle, data = exported
    shutil.copytree(bundle, tmp_path / "b")
    image = flagged_image(tmp_path / "b", data)
    Image.fromarray(image).save(tmp_path / "false-alarm.png")
    assert cli(["bundle", "add-good", str(tmp_path / "b"), str(tmp_path / "false-alarm.png"), "--device", "cpu"]) == 0
    assert "version 2" in capsys.readouterr().out
    assert not load_bundle(tmp_path / "b", device="cpu").inspect(image).anomalous
    assert cli(["bundle", "history", str(tmp_path / "b")]) == 0
    shown = capsys.readouterr().out
    assert "v2" in shown and "false-alarm.png" in shown
    assert cli(["bundle", "rollback", str(tmp_path / "b")]) == 0
    assert "version 2 -> 1" in capsys.readouterr().out
    assert load_bundle(tmp_path / "b", device="cpu").inspect(image).anomalous
    assert cli(["bundle", "add-good", str(tmp_path / "b"), str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "bundle.json").read_text()).get("bundle_version", 1) == 1


# ---- the page in a real browser -------------------------------------------------------------------------


def _browser():
    """Headless Chromium (``system.browser``); skips with the reason where one cannot be had."""
    from support.browser import BrowserUnavailable, headless_chromium

    try:
        return headless_chromium()
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))


def test_the_page_in_headless_chromium(exported, tmp_path: Path) -> None:
    """Upload an image, read the decision and score, mark it good, see the decision change; a screenshot of
    each step is kept under the test's temporary folder."""
    browser = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    bundle, data = exported
    shutil.copytree(bundle, tmp_path / "bundle")
    (tmp_path / "token").write_text(TOKEN)
    image = flagged_image(tmp_path / "bundle", data)
    Image.fromarray(image).save(tmp_path / "part.png")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    camera = tmp_path / "camera"
    camera.mkdir()
    try:
        with Processes() as processes:
            url, _ = start_station(
                processes,
                tmp_path / "bundle",
                tmp_path,
                "--token-file",
                str(tmp_path / "token"),
                "--allow-feedback",
                "--watch",
                str(camera),
            )
            wait = WebDriverWait(browser, 60)
            browser.get(url + "/")
            token = wait.until(
                lambda b: b.find_element(By.ID, "token") if b.find_element(By.ID, "token").is_displayed() else None
            )
            browser.save_screenshot(str(shots / "1-token.png"))
            token.send_keys(TOKEN)
            browser.find_element(By.ID, "token-use").click()
            wait.until(lambda b: "bundle version 1" in b.find_element(By.ID, "subtitle").text)
            meta = browser.find_element(By.ID, "meta").text
            assert "fabric" in meta
            assert "K=64: " in meta and " · K=32: " in meta and "of the training patches" in meta, meta
            assert "{" not in meta, meta  # the bank's sizes in words, not as JSON
            browser.find_element(By.ID, "file").send_keys(str(tmp_path / "part.png"))
            wait.until(lambda b: b.find_element(By.ID, "decision").text.strip() != "")
            decision = browser.find_element(By.ID, "decision")
            score = browser.find_element(By.ID, "score-text").text
            browser.save_screenshot(str(shots / "2-inspected.png"))
            assert "DEFECTIVE" in decision.text and decision.get_attribute("class") == "defective"
            assert "on the normalised scale, threshold 0.50" in score and "bundle version 1" in score
            assert browser.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png;base64,")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#recent li")) >= 1)

            # keyboard use: the feedback button takes Enter; every input has a label
            browser.find_element(By.ID, "mark-good").send_keys(Keys.ENTER)
            for field in browser.find_elements(By.CSS_SELECTOR, "input"):
                labels = browser.find_elements(By.CSS_SELECTOR, f"label[for='{field.get_attribute('id')}']")
                assert labels, field.get_attribute("id")
            wait.until(lambda b: "Bundle version 2" in b.find_element(By.ID, "feedback-status").text)
            browser.save_screenshot(str(shots / "3-marked-good.png"))
            assert "GOOD" in browser.find_element(By.ID, "decision").text
            assert browser.find_element(By.ID, "decision").get_attribute("class") == "good"
            assert "bundle version 2" in browser.find_element(By.ID, "subtitle").text
            assert "now reads: good" in browser.find_element(By.ID, "feedback-status").text
            assert (tmp_path / "bundle" / CURRENT_FILE).read_text().strip() == "versions/0002"
            # the camera folder: a new image there is shown by the page as it comes
            Image.fromarray(data.test_images[0]).save(camera / "line-0001.png")
            wait.until(
                lambda b: "new image in the camera folder: line-0001.png" in b.find_element(By.ID, "status").text
            )
            assert "folder: line-0001.png" in browser.find_element(By.ID, "score-text").text
            browser.save_screenshot(str(shots / "4-camera-folder.png"))
            logs = [  # the page's one expected error: /info refused before the token was given
                entry
                for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
            ]
            assert not logs, logs
    finally:
        browser.quit()
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-token.png",
        "2-inspected.png",
        "3-marked-good.png",
        "4-camera-folder.png",
    ]
