"""Every global a Triton kernel reads is one the compiler accepts.

Compiled Triton reads a module-level name inside an @triton.jit function only when it is a
`tl.constexpr`, another jit function, a module or a callable; a plain int global compiles under the CPU
interpreter but fails on the GPU ("Cannot access global variable ... from within @jit'ed function").
This test catches that on the CPU for every kernel module in worker/kernels.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import worker.kernels  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNEL_TYPES = (triton.runtime.jit.JITFunction, InterpretedFunction)  # the latter under TRITON_INTERPRET=1
ALLOWED = (types.ModuleType, *KERNEL_TYPES, tl.constexpr)


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names the function's code (nested code included) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _kernels():
    for info in pkgutil.iter_modules(worker.kernels.__path__):
        module = importlib.import_module(f"worker.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KERNEL_TYPES) and obj.fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", obj


def test_there_are_kernels_to_check():
    assert len(list(_kernels())) >= 10


@pytest.mark.parametrize("name,kernel", list(_kernels()), ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_globals_are_constexpr(name, kernel):
    scope = kernel.fn.__globals__
    bad = {g: type(scope[g]).__name__ for g in _names(kernel.fn.__code__)
           if g in scope and not (isinstance(scope[g], ALLOWED) or callable(scope[g]))}
    assert not bad, f"{name} reads non-constexpr globals {bad}; define them as tl.constexpr(...)"


def test_the_check_catches_a_plain_int_global():
    """The check itself: a kernel reading a plain int global is flagged."""
    source = "import triton\nCOLUMN = 3\n@triton.jit\ndef k(p):\n    p + COLUMN\n"
    scope: dict = {}
    exec(compile(source, "<kernel>", "exec"), scope)
    kernel = scope["k"]
    flagged = {g for g in _names(kernel.fn.__code__) if g in scope and not isinstance(scope[g], ALLOWED)
               and not callable(scope[g])}
    assert flagged == {"COLUMN"}
