"""Write gn_triton's build for the Hugging Face kernels hub (docs/distribution.md): `make hub`, or

    python release/hub.py [--out build/hub]

OUT/README.md, OUT/LICENSE and one noarch variant per backend the kernels take (Triton compiles them
on the user's machine, so no variant holds a binary):

    OUT/build/torch-cuda/   OUT/build/torch-rocm/   OUT/build/torch-cpu/
        __init__.py ... layers.py   gn_triton/ as it is (the package imports itself relatively only)
        kernels/                    kernels/ of the repository: gn_triton.kernels, as a subpackage
        metadata.json               what `kernels` reads (below)

`kernels` imports a variant under its metadata's `id`, a name unique to the build: `_gn_triton_<backend>_`
and a hash of the copied files. gn_triton registers its torch.library ops under its module name
(gn_triton/_ops.py), so a hub copy's ops never collide with an installed gn_triton's or another build's.
The metadata's `digest` holds each file's SHA-256 (base64), which `kernels` checks on every load.
Standard library only: this copies files and writes JSON.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "gn-triton"  # the hub repository's name; `kernels` imports it as gn_triton (with its build id)
HUB_VERSION = 1  # the kernel's API version on the hub: a branch v1, what get_kernel(..., version=1) loads
BACKENDS = ("cuda", "rocm", "cpu")
# `kernels` accepts only dependencies from its own list in python-depends; torch and triton are the
# environment's (a CUDA or ROCm build of torch brings triton; a CPU build needs `pip install triton`).
PYTHON_DEPENDS: list[str] = []


def sources(root: Path = ROOT) -> dict[str, Path]:
    """The variant's files by their path in it: gn_triton/'s, and kernels/ as its subpackage."""
    files = {p.name: p for p in sorted((root / "gn_triton").iterdir()) if p.suffix == ".py" or p.name == "py.typed"}
    files |= {f"kernels/{p.name}": p for p in sorted((root / "kernels").glob("*.py"))}
    return files


def check_relative_imports(files: dict[str, Path]) -> None:
    """Raise if a copied module imports gn_triton by name: the hub imports the copy under another name,
    where such an import would load an installed gn_triton (or fail) instead of the copy's own modules."""
    for name, path in files.items():
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            if any(m == "gn_triton" or m.startswith("gn_triton.") for m in modules):
                raise SystemExit(f"{path}:{node.lineno}: imports gn_triton by name; the hub copy imports relatively")


def build_id(files: dict[str, Path], backend: str) -> str:
    """A module name unique to these files and backend, in kernel-builder's form _<name>_<backend>_<hash>."""
    digest = hashlib.sha256()
    for name, path in files.items():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"_{NAME.replace('-', '_')}_{backend}_{digest.hexdigest()[:10]}"


def file_digest(variant: Path) -> dict:
    """`kernels`' digest of a variant: every file but metadata.json (and bytecode), SHA-256 in base64."""
    files = {}
    for path in sorted(variant.rglob("*")):
        name = path.relative_to(variant).as_posix()
        if path.is_file() and name != "metadata.json" and "__pycache__" not in path.parts:
            files[name] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"algorithm": "sha256", "files": files}


def version(root: Path = ROOT) -> str:
    """gn_triton's version, from its one place (gn_triton/_version.py)."""
    return re.search(r'__version__ = "([^"]+)"', (root / "gn_triton" / "_version.py").read_text()).group(1)


README = """---
license: mit
tags:
- kernels
---

# gn-triton

gn_triton {version}: a drop-in `torch.nn.GroupNorm` written in Triton (forward and backward, fused SiLU/GELU
and scale-shift, deterministic gradients). Noarch builds for CUDA, ROCm and the CPU (Triton's interpreter
when `TRITON_INTERPRET=1` is set before loading; torch's own GroupNorm otherwise).

```python
import torch
from kernels import get_kernel

gn = get_kernel("ORG/gn-triton", version={hub_version})
y = gn.group_norm(x, 32, weight, bias, eps=1e-5)  # = torch.nn.functional.group_norm
```

Layers for `kernels.kernelize`: `GroupNorm` (the forward of `nn.GroupNorm`) and `GroupNormSiLU` (a layer
computing SiLU(GroupNorm(x))). Where gn_triton does not run a call (another device, a CPU without the
interpreter, another dtype) they run torch's own `F.group_norm`. Needs torch >= 2.11 and triton >= 3.6.
Source, documentation and tests: the gn_triton repository (docs/distribution.md).
"""


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Write the hub layout to `out` (replacing what is there); returns the variant directories."""
    files = sources(root)
    check_relative_imports(files)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(root / "LICENSE", out / "LICENSE")
    (out / "README.md").write_text(README.format(version=version(root), hub_version=HUB_VERSION))
    variants = []
    for backend in BACKENDS:
        variant = out / "build" / f"torch-{backend}"
        for name, path in files.items():
            (variant / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, variant / name)
        metadata = {
            "name": NAME,
            "id": build_id(files, backend),
            "version": HUB_VERSION,
            "license": "MIT",
            "python-depends": PYTHON_DEPENDS,
            "backend": {"type": backend},
            "digest": file_digest(variant),
        }
        (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        variants.append(variant)
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "hub", help="where to write (replaced)")
    args = parser.parse_args(argv)
    for variant in build(args.out):
        print(f"{variant}: {json.loads((variant / 'metadata.json').read_text())['id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
