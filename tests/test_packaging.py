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
