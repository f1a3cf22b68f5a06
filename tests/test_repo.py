"""The README's two commands stay true to what CI runs."""

from __future__ import annotations

import re

from .conftest import REPO


def _readme_commands():
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_readme_has_install_and_test_commands():
    install, tests = _readme_commands()[:2]
    assert "pip install torch==2.13.0" in install and 'pip install -e ".[dev]"' in install
    assert tests.strip() == "python -m pytest -q"


def test_ci_runs_the_readme_test_command_and_installs_torch_first():
    ci = (REPO / ".ci" / "run").read_text()
    _, tests = _readme_commands()[:2]
    lines = [line.split("#")[0].strip() for line in ci.splitlines()]
    assert tests.strip() in lines
    assert lines.index("pip install torch==2.13.0") < lines.index('pip install -e ".[dev]"')


def test_pyproject_keeps_torch_loose():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in text
