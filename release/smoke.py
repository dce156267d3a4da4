"""The installed wheel's smoke test (release/dist.py smoke runs it in a fresh environment, from a folder
outside the repository, with TRITON_INTERPRET=1): gn_triton imports from that environment, not from the
source tree; one group_norm runs gn_triton's kernels in Triton's interpreter and matches torch in
float64; `python -m gn_triton.explain` runs and says it has no measured results.

    python smoke.py REPOSITORY_ROOT
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import gn_triton

root = Path(sys.argv[1]).resolve()
package = Path(gn_triton.__file__).resolve().parent
assert package.is_relative_to(Path(sys.prefix).resolve()), f"gn_triton from {package}, not the environment"
assert not package.is_relative_to(root), f"gn_triton from the source tree {root}"
# The only place on sys.path holding a gn_triton is the environment's (the borrowed torch has none).
homes = [p for p in sys.path if (Path(p or ".") / "gn_triton" / "__init__.py").exists()]
assert [Path(p).resolve() for p in homes] == [package.parent], homes
assert importlib.metadata.version("gn_triton") == gn_triton.__version__
assert (package / "py.typed").is_file() and (package / "kernels" / "gn_fwd.py").is_file()

x = (torch.randn(3, 6, 5, 7, dtype=torch.float64) + 100).requires_grad_()
w, b = 1 + torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
assert gn_triton.backend_for(x) == "interpreter"
y = gn_triton.group_norm(x, 3, w, b)
(dx,) = torch.autograd.grad(y, x, y.detach())
expected = F.group_norm(x, 3, w, b)
(dx_expected,) = torch.autograd.grad(expected, x, expected.detach())
torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
torch.testing.assert_close(dx, dx_expected, rtol=0, atol=1e-9)

explain = subprocess.run([sys.executable, "-m", "gn_triton.explain", "2x64x33x17:8", "--dtype", "fp32"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
assert "PREDICTED BY gn_triton's COST MODEL" in explain and "No measured results here" in explain, explain
print(f"smoke test passed: gn_triton {gn_triton.__version__} from {package}")
