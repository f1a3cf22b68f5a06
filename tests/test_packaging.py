"""Packaging: a torch-free base install with the bridges' console scripts, the node as the `node` extra."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_ONLY = ("torch", "rerun", "safetensors")  # what the `node` extra brings; a camera host has none of it
SCRIPTS = {"streamrecon-camera-pub": "streamrecon_bridges.camera_pub:main",
           "streamrecon-results-sub": "streamrecon_bridges.results_sub:main"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> list[str]:
    return [re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in reqs]


def test_pyproject_metadata():
    meta = _pyproject()
    project = meta["project"]
    for name, target in SCRIPTS.items():
        assert project["scripts"].get(name) == target, name
    base = _names(project["dependencies"])
    assert not {"torch", "rerun-sdk", "safetensors"} & set(base), base
    assert {"numpy", "opencv-python", "pyzmq", "pillow", "pyyaml"} <= set(base), base
    extras = project["optional-dependencies"]
    assert {"torch", "rerun-sdk", "safetensors"} <= set(_names(extras["node"]))
    assert "streamrecon[node]" in extras["dev"]
    assert "pycolmap" in _names(extras["export"]) and "streamrecon[export]" in extras["dev"]  # --export colmap, tested
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").is_file()

    floors = [re.fullmatch(r"setuptools\s*>=\s*([0-9.]+)", r.strip()) for r in meta["build-system"]["requires"]]
    floor = next(m.group(1) for m in floors if m)
    assert tuple(int(p) for p in floor.split(".")) >= (77,), floor  # 77.0: PEP 639 license expressions

    assert any(m.startswith("slow:") for m in meta["tool"]["pytest"]["ini_options"]["markers"])


def test_every_streamrecon_folder_is_packaged():
    """`packages` is a list (a package-dir rename rules out `packages.find`): a new folder must be added."""
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"streamrecon_bridges": "bridges"}
    packages = set(setuptools["packages"])
    assert "streamrecon_bridges" in packages and "bridges" not in packages
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "streamrecon").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert folders - packages == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {p for p in packages if p.startswith("streamrecon.")} <= folders, "listed packages that do not exist"


def test_installed_console_scripts_resolve():
    """The installed metadata (`pip install -e .`) carries the scripts; stale if pyproject.toml changed since."""
    eps = {ep.name: ep for ep in metadata.distribution("streamrecon").entry_points if ep.group == "console_scripts"}
    for name, target in SCRIPTS.items():
        assert name in eps, f"{name} missing: reinstall with pip install -e '.[dev]'"
        assert eps[name].value == target and callable(eps[name].load())


@pytest.mark.parametrize("module", ["streamrecon_bridges.camera_pub", "streamrecon_bridges.results_sub"])
def test_bridge_help_runs_without_torch(module):
    """`python -m <module> --help` with torch, rerun and safetensors unimportable exits 0."""
    code = ("import runpy, sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.partition('.')[0] in {NODE_ONLY!r}:\n"
            "            raise ModuleNotFoundError(f'{name} blocked', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.argv = [{module!r}, '--help']\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:"), r.stdout
