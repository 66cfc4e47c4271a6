"""The documentation site builds with `mkdocs build --strict` (issue 24: broken links, missing pages and stale
anchors fail), and README.md stays a front page whose links all lead somewhere."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[dev]' brings them)")
def test_the_site_builds_strict_without_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("index.html", "troubleshooting/index.html", "reference/configuration/index.html",
                 "overlap_study/index.html", "fashion_labeled/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a page under docs/"


def test_every_link_of_the_readme_leads_to_a_file():
    targets = [t for t in LINK.findall(README.read_text()) if "://" not in t and not t.startswith("#")]
    assert len(targets) >= 20
    missing = [t for t in targets if not (REPO / t.split("#", 1)[0]).exists()]
    assert not missing, missing
