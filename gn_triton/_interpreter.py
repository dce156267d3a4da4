"""Triton's interpreter under numpy 2.4 and newer.

The interpreter holds every scalar as a 1-element array and turns a loop bound into a Python int by
patching `tl.tensor.__index__` for each launch. Triton 3.6 converts with `int(array)`, which numpy 2.4
refuses for arrays of one dimension ("only 0-dimensional arrays can be converted to Python scalars"), so
every kernel loop with a runtime bound fails there; triton 3.7 converts `int(array.squeeze())`. Where the
installed interpreter fails that way (checked by trying it, not by version), its per-launch patch is
followed by the squeezing one. Applied only when the interpreter runs gn_triton's kernels; compiled
kernels never take this path.
"""

from __future__ import annotations

import operator


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


def fix_loop_bounds() -> bool:
    """Make the interpreter's loop bounds work under numpy >= 2.4 where they do not; True if patched."""
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
