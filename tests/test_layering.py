"""Layering rules (docs/design.md, GUIDE §2), read from the source: the kernels import only triton, and
torch's private API (torch._...) is used only by the files listed here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What kernels/ (installed as gn_triton.kernels) may import besides its own modules.
KERNEL_IMPORTS = {"triton", "hashlib", "pathlib", "typing"}

# The files of gn_triton/ that reach into torch._...: the compat module of issue #29 will shrink this list to
# one file. A new entry needs a reason in the file (which torch versions, what public API is missing).
PRIVATE_TORCH_ALLOWED = {
    "gn_triton/_plan.py",  # torch._prims_common.suggest_memory_format
    "gn_triton/autograd.py",  # functorch's interpreter stack, torch._C's tracing and dispatch-mode state
    "gn_triton/functional.py",  # torch._C._are_functorch_transforms_active
    "gn_triton/compile_fusion.py",  # torch._inductor's config and custom pass
    "gn_triton/eager_override.py",  # torch._native's override registry
}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module or ""))
    return found


def _private_torch(tree: ast.AST) -> list[int]:
    """Lines that import from or read an attribute of torch._..."""
    lines = [line for line, module in _imports(tree) if module.startswith("torch._")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                lines.append(node.lineno)
    return sorted(lines)


def test_kernels_import_only_triton():
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / "kernels").glob("*.py"))
        for line, module in _imports(ast.parse(path.read_text()))
        if module.split(".")[0] not in KERNEL_IMPORTS
    ]
    assert not wrong, f"kernels/ imports only triton (and {sorted(KERNEL_IMPORTS - {'triton'})}): {wrong}"


def test_private_torch_api_only_in_allowed_files():
    using = {}
    for path in sorted((ROOT / "gn_triton").glob("*.py")):
        lines = _private_torch(ast.parse(path.read_text()))
        if lines:
            using[path.relative_to(ROOT).as_posix()] = lines
    outside = {name: lines for name, lines in using.items() if name not in PRIVATE_TORCH_ALLOWED}
    assert not outside, f"torch._... outside PRIVATE_TORCH_ALLOWED (tests/test_layering.py): {outside}"
    stale = PRIVATE_TORCH_ALLOWED - set(using)
    assert not stale, f"no longer use torch._...: remove them from PRIVATE_TORCH_ALLOWED: {sorted(stale)}"
