"""Shared pytest set-up."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """test.sh sets NANOCHAT_SKIP_BROWSER when it found no Chromium and could not install one (it printed how
    to). Only then, and never in CI (which installs it), are the real-browser tests skipped."""
    if not os.environ.get("NANOCHAT_SKIP_BROWSER") or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(
        reason="no /usr/bin/chromium on this machine (bash test.sh printed how to install it)"
    )
    for item in items:
        if item.nodeid.startswith("tests/test_browser.py"):
            item.add_marker(skip)
