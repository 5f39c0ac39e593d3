"""A screenshot of the station page as the line sees it: serve a bundle, upload one image in headless Chromium.

    .venv/bin/python scripts/station_screenshot.py BUNDLE IMAGE OUT.png [--watch FOLDER]

Starts ``patchsvdd serve BUNDLE`` on a free loopback port (feedback on, with a throw-away token), opens the
page, gives the token, uploads IMAGE, waits for the decision and writes the screenshot (docs/figures/station.png
was made so, from the authors' released bottle encoder's bundle and a broken_large test image of bottle).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

from patchsvdd.federated.local import Processes, wait_for
from patchsvdd.system.probes import free_port, service_healthy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.browser import headless_chromium  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("image", type=Path, nargs="+", help="images to upload in turn; the last one is shown")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1180)
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as folder, Processes() as processes:
        token = secrets.token_hex(16)
        (Path(folder) / "token").write_text(token)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "patchsvdd.cli.main", "serve", str(args.bundle), "--port", str(port)]
        command += ["--token-file", str(Path(folder) / "token"), "--allow-feedback"]
        node = processes.start("serve", command, Path(folder) / "serve.log")
        wait_for(lambda: service_healthy(url), 300, "the station to answer /health", [node])
        browser = headless_chromium(args.width, args.height)
        try:
            wait = WebDriverWait(browser, 300)
            browser.get(url + "/")
            wait.until(lambda b: b.find_element(By.ID, "token").is_displayed())
            browser.find_element(By.ID, "token").send_keys(token)
            browser.find_element(By.ID, "token-use").click()
            wait.until(lambda b: "bundle version" in b.find_element(By.ID, "subtitle").text)
            for number, image in enumerate(args.image, start=1):
                browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
                wait.until(lambda b, n=number: len(b.find_elements(By.CSS_SELECTOR, "#recent li")) >= n)
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("inspected " + args.image[-1].name))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
        finally:
            browser.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
