"""Run Triton kernels in Triton's CPU interpreter when there is no CUDA device.

Imported by conftest before anything imports triton: the interpreter is chosen
when the kernels are decorated. The interpreter turns loaded scalars into
Python ints with `int(array)`, which numpy >= 2.4 refuses for 1-element arrays
(used as loop bounds in our kernels); `item()` does the same conversion.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.runtime.interpreter as _interpreter
    except ImportError:
        _interpreter = None
    if _interpreter is not None and hasattr(_interpreter, "_patch_lang_tensor"):
        _patch_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        _interpreter._patch_lang_tensor = _patch_lang_tensor
