"""The real `promtool` (Debian's prometheus package): skipped where it is missing, except in CI
(CI=true), where .ci/run installs it and its absence is a failure."""

from __future__ import annotations

import os
import shutil

import pytest


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: .ci/run installs it (Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs this check")
    return path
