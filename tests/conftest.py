"""Fixtures every test file gets."""

import pytest

from manifests.profiles import PROFILE_DIR_ENV


@pytest.fixture(autouse=True)
def _no_saved_profiles(tmp_path, monkeypatch):
    """`--target auto` and `runtime.load` prefer a profile `runtime calibrate --save` measured on
    this machine; no test may see the user's own (a test that wants saved profiles sets its own)."""
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "no-profiles"))
