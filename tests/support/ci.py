"""The suite's CI rule (tests/conftest.py applies it): under CI, SCSI_TARGET_CI=1,
a skip is a failure that says why; `need_root` is the one way a test asks for root."""
from __future__ import annotations

import os

import pytest

# set by .ci/run: CI runs as root with every package of scripts/test-deps, so a
# test that skips there did not check what it claims, and is a failure
CI_VAR = "SCSI_TARGET_CI"


def need_root(what: str) -> None:
    """Skip unless we are root (a failure under CI, as every skip is)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what}: needs root (the suite runs as root: docs/testing.md)")
