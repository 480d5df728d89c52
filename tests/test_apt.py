"""The test-service installer says what to do when it cannot install."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apt import AptError, apt_install
from tests.browser import find


def test_without_apt_get_the_error_says_what_to_do_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no sudo, nothing
    with pytest.raises(AptError, match=r"Widget is not installed .* set WIDGET_URL"):
        apt_install(["widget"], what="Widget", otherwise="set WIDGET_URL")


def test_chromium_from_the_environment_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLENS_TEST_CHROMIUM", "/opt/chrome")
    monkeypatch.setenv("FEDLENS_TEST_CHROMEDRIVER", "/opt/driver")
    found = find()
    assert found is not None
    assert (str(found.browser), str(found.driver)) == ("/opt/chrome", "/opt/driver")
