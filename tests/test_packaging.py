"""The package's metadata: the license file and expression, one version source, classifiers."""

import sys
from pathlib import Path

import pytest

import gn_triton
from gn_triton import _version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_pyproject_metadata():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # the expression says it
    assert "Environment :: GPU :: NVIDIA CUDA" in project["classifiers"]
    assert "version" not in project and project["dynamic"] == ["version"]
    source = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert source == "gn_triton._version.__version__" and gn_triton.__version__ == _version.__version__
    setuptools = next(r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert setuptools == "setuptools>=77"  # the first release with license expressions and license-files


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_release_files():
    """What the wheel and sdist carry besides the code (release/dist.py checks the built archives): py.typed
    as package data, the changelog with an entry for this version, the kernels package pinned for the
    hub tests."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["gn_triton"] == ["py.typed"]
    assert (ROOT / "gn_triton" / "py.typed").is_file()
    assert f"## {gn_triton.__version__} " in (ROOT / "CHANGELOG.md").read_text()
    assert "include CHANGELOG.md" in (ROOT / "MANIFEST.in").read_text().splitlines()
    assert any(r.startswith("kernels==") for r in pyproject["project"]["optional-dependencies"]["test"])
