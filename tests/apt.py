"""Installing the Debian packages the tests need (PostgreSQL, Chromium) with apt-get.

The test sessions call :func:`apt_install` only when a package's programs are missing. It
runs as root, or through ``sudo -n`` (never prompting), and waits for another apt-get's
lock instead of failing on it, since two installs may start at once on a fresh machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["AptError", "apt_install"]

_LOCK_WAIT = ["-o", "DPkg::Lock::Timeout=900"]


class AptError(RuntimeError):
    """The packages could not be installed; the message says what to do instead."""


def apt_install(packages: Sequence[str], *, what: str, otherwise: str) -> None:
    """``apt-get update`` then ``apt-get install -y --no-install-recommends packages``.

    ``what`` names the software in messages; ``otherwise`` says what a user without
    apt-get or root can do instead (e.g. point an environment variable at a server).
    """
    if shutil.which("apt-get") is None:
        raise AptError(
            f"{what} is not installed and there is no apt-get to install it: {otherwise}"
        )
    # env(1) passes the setting through sudo, which would drop it from the environment
    prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise AptError(
                f"{what} is not installed and installing it needs root: run "
                f"`apt-get install -y {' '.join(packages)}` as root, or {otherwise}"
            )
        prefix = ["sudo", "-n", *prefix]
    print(f"installing {what} with apt-get ...", file=sys.stderr)
    _run([*prefix, "apt-get", *_LOCK_WAIT, "update"], timeout=900)
    install = ["install", "-y", "--no-install-recommends", *packages]
    _run([*prefix, "apt-get", *_LOCK_WAIT, *install], timeout=1800)


def _run(command: list[str], *, timeout: float) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        raise AptError(
            f"{' '.join(command)} failed ({exc.returncode}): {exc.stderr.strip()[-2000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise AptError(f"{' '.join(command)} took longer than {timeout:.0f} s") from None
