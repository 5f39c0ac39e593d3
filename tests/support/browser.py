"""Headless Chromium for looking at the station page as a person would: Debian's ``chromium`` and
``chromium-driver`` packages (``make test-tools``), driven with selenium."""

from __future__ import annotations

import shutil
from typing import Any


class BrowserUnavailable(RuntimeError):
    """No headless Chromium can be had here; the message says what is missing and how to get it."""


def headless_chromium(width: int = 1280, height: int = 1000) -> Any:
    """A selenium ``webdriver.Chrome`` on the system's chromium and chromedriver, headless, ``width`` x
    ``height``; BrowserUnavailable with the reason where selenium, chromium or chromedriver is missing.
    The caller quits it."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (it is in requirements/test.txt)") from None
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None)
        raise BrowserUnavailable(
            f"no {missing} on PATH: 'make test-tools' installs Debian's chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except Exception as exc:  # selenium's own errors: a chromium that does not start here
        raise BrowserUnavailable(f"chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
