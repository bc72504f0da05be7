"""CI lints first and then runs exactly the README's test command; the tree is ruff-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"Run the tests.*?```bash\n(.*?)\n```", text, re.S)
    assert block, "README lost its test command"
    return block.group(1).strip()


def test_ci_lints_first_then_runs_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    command = readme_test_command()
    assert command in script.splitlines()
    lint = script.index("ruff check")
    assert script.index("ruff format --check") < script.index(command) and lint < script.index(command)
    assert script.index("bash scripts/setup.sh") < lint  # ruff comes from the venv


def _ruff() -> str:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        ruff = shutil.which("ruff")
        if ruff is None:
            pytest.skip("ruff is not installed (a test extra)")
    return str(ruff)


def test_tree_is_ruff_clean():
    for args in (["check", "."], ["format", "--check", "pretrain", "tests", "scripts"]):
        res = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
