"""docs/appliance.1 is generated from the parser and must be current and render cleanly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.cli import _parser
from appliance.manpage import manpage

PAGE = Path(__file__).resolve().parents[2] / "docs" / "appliance.1"


def test_manpage_is_current() -> None:
    assert PAGE.read_text() == manpage(_parser()), (
        "docs/appliance.1 is stale: run python -m appliance.manpage > docs/appliance.1"
    )


def test_manpage_has_every_command_and_section() -> None:
    text = manpage(_parser())
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ENVIRONMENT"):
        assert f".SH {section}" in text
    for name in ("render", "import", "backup", "restore", "completion", "APPLIANCE_TOKEN_FILE"):
        assert name in text


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_manpage_renders_without_warnings() -> None:
    out = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert out.stderr == ""
