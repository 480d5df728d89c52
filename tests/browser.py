"""Headless Chromium for the dashboard's browser tests, installed if the machine lacks it.

The dashboard's browser test asks for it once (the ``browser`` fixture in
``tests/e2e/test_jobs_federation.py``); by hand::

    .venv/bin/python -m tests.browser        # prints the browser and driver it found

Without ``chromium`` and ``chromedriver`` (on the ``PATH``, or Debian's ``/usr/bin``) it runs
``apt-get install -y chromium chromium-driver`` (:mod:`tests.apt`). With
``FEDLENS_TEST_CHROMIUM`` and ``FEDLENS_TEST_CHROMEDRIVER`` set, those binaries are used and
nothing is installed.

The browser starts with the flags a closed network needs: no background networking, no
component updates, no sync, no first-run page, so it never reaches for a host outside the
machine, and a fresh profile directory per test session.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.apt import AptError, apt_install

__all__ = ["BrowserError", "ChromiumBinaries", "find", "install", "launch_flags"]

ENV_BROWSER = "FEDLENS_TEST_CHROMIUM"
ENV_DRIVER = "FEDLENS_TEST_CHROMEDRIVER"
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
_PACKAGES = ("chromium", "chromium-driver")


class BrowserError(RuntimeError):
    """Chromium or its driver could not be found or installed."""


@dataclass(frozen=True)
class ChromiumBinaries:
    browser: Path
    driver: Path


def find() -> ChromiumBinaries | None:
    """The browser and driver on this machine, or None if either is missing."""
    browser_env, driver_env = os.environ.get(ENV_BROWSER), os.environ.get(ENV_DRIVER)
    if browser_env and driver_env:
        return ChromiumBinaries(Path(browser_env), Path(driver_env))
    browser = next((p for p in map(shutil.which, _BROWSER_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    return ChromiumBinaries(Path(browser), Path(driver))


def install() -> ChromiumBinaries:
    """Install Debian's ``chromium`` and ``chromium-driver`` with apt-get."""
    try:
        apt_install(
            _PACKAGES,
            what="Chromium and chromedriver",
            otherwise=f"install both, or set {ENV_BROWSER} and {ENV_DRIVER}",
        )
    except AptError as exc:
        raise BrowserError(str(exc)) from None
    found = find()
    if found is None:
        raise BrowserError("apt-get installed chromium but chromium or chromedriver is not on PATH")
    return found


def find_or_install() -> ChromiumBinaries:
    return find() or install()


def launch_flags(profile_dir: Path) -> list[str]:
    """Chromium's command-line flags for a headless run on a machine with no outside network."""
    return [
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--window-size=1280,900",
        f"--user-data-dir={profile_dir}",
    ]


if __name__ == "__main__":
    binaries = find_or_install()
    print(f"browser {binaries.browser}\ndriver  {binaries.driver}")
