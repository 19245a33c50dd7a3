"""The shell scripts in tools/ parse (a typo in the Termux boot script would only show on a phone)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT

SCRIPTS = sorted([*ROOT.glob("tools/*.sh"), *ROOT.glob("tools/termux/*"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_shell_script_parses(script):
    shell = "sh" if "start-nomoat" in script.name else "bash"
    done = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
