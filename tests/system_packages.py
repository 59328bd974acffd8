"""Debian packages that tests need: installed with apt-get when missing, else a clear skip."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

_updated = False


@functools.cache
def ensure_binary(binary: str, package: str) -> str:
    """Path of `binary`, installing Debian `package` when it is missing; skips the test if
    that is impossible (not root, no apt-get, or the install failed)."""
    found = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{binary} is missing and cannot be installed here (needs root and apt-get for {package})")
    error = _apt_install(package)
    found = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if not found:
        pytest.skip(f"{binary} is missing and `apt-get install {package}` failed: {error[-500:]}")
    return found


def _apt_install(package: str) -> str:
    global _updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends", package]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0 and not _updated:
        _updated = True
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return result.stdout + result.stderr
