"""The package index route (docs/distribution.md): build gn_triton's sdist and wheel from a clean copy of
the repository and check them (`make dist`), then install the wheel into a fresh environment and test it
there, away from the source tree (`make release-check`).

    python release/dist.py build [--out dist]
    python release/dist.py smoke [WHEEL]      (default: dist/'s wheel of this version)

build: copies the files git tracks (nothing ignored or untracked: no venv, egg-info or build/ leaks in)
to a temporary folder, runs `python -m build` there (the sdist, then the wheel from the sdist, so the sdist
is known to be complete), `twine check --strict` (the metadata renders on the index) and checks what each
archive holds. Needs `build` and `twine`. For a release, run it on a clean checkout of the release tag.

smoke: a new virtual environment that sees this Python's packages (torch, triton, numpy; gn_triton must
not be among them) through a .pth file, so that no torch is installed again; pip installs the wheel into
it with its dependencies resolved offline, and release/smoke.py runs from a temporary folder outside the
repository: the import, one group_norm in Triton's interpreter against torch in float64, `explain`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

from hub import ROOT, version  # release/hub.py, beside this script


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, args)), flush=True)
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def clean_copy(dest: Path) -> None:
    """The tracked files of the working tree, as they are now, into dest."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    if dirty.stdout.strip():
        print("note: the working tree has uncommitted changes; a release is built from a clean checkout of its tag")


def check_wheel(wheel: Path, v: str) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"gn_triton-{v}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    expected = {"gn_triton/__init__.py", "gn_triton/py.typed", "gn_triton/layers.py", "gn_triton/kernels/gn_fwd.py",
                f"{info}/licenses/LICENSE"}  # fmt: skip
    missing = expected - names
    stray = {n for n in names if not n.startswith(("gn_triton/", f"{info}/"))}
    assert not missing and not stray, f"{wheel.name}: missing {sorted(missing)}, stray {sorted(stray)}"
    assert f"\nVersion: {v}\n" in metadata and "\nLicense-Expression: MIT\n" in metadata, metadata[:600]
    assert "\nRequires-Dist: torch>=2.11\n" in metadata and "\nRequires-Dist: triton>=3.6\n" in metadata


def check_sdist(sdist: Path, v: str) -> None:
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    expected = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "gn_triton/py.typed", "kernels/gn_fwd.py"}
    assert expected <= names, f"{sdist.name}: missing {sorted(expected - names)}"
    stray = [n for n in names if n.startswith((".venv", "build/", "dist/")) or "__pycache__" in n]
    assert not stray, f"{sdist.name}: holds {stray[:5]}"


def build(out: Path) -> None:
    v = version()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"gn_triton-{v}*"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="gn_triton_dist_") as tmp:
        clean_copy(Path(tmp))
        run(sys.executable, "-m", "build", "--outdir", out.resolve(), tmp)
    wheel, sdist = out / f"gn_triton-{v}-py3-none-any.whl", out / f"gn_triton-{v}.tar.gz"
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    check_wheel(wheel, v)
    check_sdist(sdist, v)
    print(f"built and checked: {wheel}, {sdist}")


def smoke(wheel: Path) -> None:
    here = Path(sysconfig.get_paths()["purelib"])
    assert not list(here.glob("gn_triton*")), f"{here} holds gn_triton: the smoke test needs a Python without it"
    with tempfile.TemporaryDirectory(prefix="gn_triton_smoke_") as tmp:
        venv, work = Path(tmp) / "venv", Path(tmp) / "work"
        # Without pip (and the old setuptools a venv brings, which would hide this Python's newer one that
        # torch requires): this Python's pip installs into it. Not --system-site-packages: that would be
        # the base interpreter's, which has no torch.
        run(sys.executable, "-m", "venv", "--without-pip", venv)
        python = venv / "bin" / "python"
        site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())  # fmt: skip
        (site / "_gn_triton_smoke_base.pth").write_text(f"{here}\n")
        pip = (sys.executable, "-m", "pip", "--python", python)
        run(*pip, "install", "-q", "--no-index", f"{wheel.resolve()}[interpreter]")
        work.mkdir()
        shutil.copy2(ROOT / "release" / "smoke.py", work / "smoke.py")
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": tmp, "TRITON_INTERPRET": "1"}
        run(python, "smoke.py", str(ROOT), cwd=work, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    build_step = steps.add_parser("build", help="build and check the sdist and wheel")
    build_step.add_argument("--out", type=Path, default=ROOT / "dist", help="where the archives go")
    smoke_step = steps.add_parser("smoke", help="install the wheel in a fresh environment and test it")
    wheel = ROOT / "dist" / f"gn_triton-{version()}-py3-none-any.whl"
    smoke_step.add_argument("wheel", type=Path, nargs="?", default=wheel)
    args = parser.parse_args(argv)
    if args.step == "build":
        build(args.out)
    else:
        smoke(args.wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
