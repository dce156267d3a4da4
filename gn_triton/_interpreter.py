"""Fixes to Triton's interpreter, applied when it runs gn_triton's kernels (gn_triton/__init__.py calls
fix_loop_bounds() at import when TRITON_INTERPRET=1); compiled kernels never take these paths.

Threads: the interpreter patches triton.language's functions for the length of each launch (and
restores them after), so two launches at once in two threads break each other ("x >= grid_dim[0]",
"`_semantic` argument must be provided outside of JIT functions"). serialise_launches() makes every
interpreted launch of the process take one lock (LAUNCH_LOCK): the interpreter is for tests, and runs
programs one after another anyway.

Loop bounds under numpy 2.4 and newer: the interpreter holds every scalar as a 1-element array and turns
a loop bound into a Python int by patching `tl.tensor.__index__` for each launch. Triton 3.6 converts
with `int(array)`, which numpy 2.4 refuses for arrays of one dimension ("only 0-dimensional arrays can
be converted to Python scalars"), so every kernel loop with a runtime bound fails there; triton 3.7
converts `int(array.squeeze())`. Where the installed interpreter fails that way (checked by trying it,
not by version), its per-launch patch is followed by the squeezing one. Applied only when the
interpreter runs gn_triton's kernels; compiled kernels never take this path.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading

# Held by every interpreted launch (serialise_launches); reentrant, so that a pre-run hook launching
# another kernel cannot deadlock.
LAUNCH_LOCK = threading.RLock()


def _index_of_one_element_works(interpreter, tl, np) -> bool:
    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(tl.tensor, scope)
        operator.index(tl.tensor(interpreter.TensorHandle(np.ones(1, np.int32), tl.int32), tl.int32))
        return True
    except TypeError:
        return False
    finally:
        scope.restore()


def serialise_launches() -> None:
    """Make every interpreted kernel launch of the process hold LAUNCH_LOCK (once; idempotent)."""
    from triton.runtime.interpreter import InterpretedFunction

    # This copy's kernels: "gn_triton.kernels" when installed; a kernels-hub copy has its own module name.
    kernels = __name__.rpartition(".")[0] + ".kernels"
    run = InterpretedFunction.run
    if getattr(run, "_gn_triton_serialised", False):
        getattr(run, "_gn_triton_kernels", set[str]()).add(kernels)  # the first copy patched it; each adds its kernels
        return

    import numpy as np

    @functools.wraps(run)
    def serialised_run(self, *args, **kwargs):
        # gn_triton's kernels get a GPU's float semantics: exp(-z) of a large |z| overflows to inf
        # silently (SiLU/GELU then give their limits), where numpy would warn on every launch.
        module = getattr(getattr(self, "fn", None), "__module__", "")
        ours = module.rpartition(".")[0] in serialised_run._gn_triton_kernels
        with LAUNCH_LOCK, np.errstate(over="ignore") if ours else contextlib.nullcontext():
            return run(self, *args, **kwargs)

    serialised_run._gn_triton_serialised = True  # type: ignore[attr-defined]  # a function's own attributes
    serialised_run._gn_triton_kernels = {kernels}  # type: ignore[attr-defined]
    InterpretedFunction.run = serialised_run


def fix_loop_bounds() -> bool:
    """Make the interpreter's loop bounds work under numpy >= 2.4 where they do not; True if patched.
    Also serialises the interpreter's launches across threads (serialise_launches): this is the
    function gn_triton's import calls when the interpreter is on."""
    serialise_launches()
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    needed = ("_LangPatchScope", "_patch_lang_tensor", "TensorHandle")
    if not all(hasattr(interpreter, name) for name in needed) or _index_of_one_element_works(interpreter, tl, np):
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
