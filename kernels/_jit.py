"""``jit``: a Triton kernel that runs compiled on CUDA tensors and through Triton's interpreter on CPU tensors.

``triton.jit`` decides between compiling and interpreting once, when the decorated module is imported, from
``TRITON_INTERPRET``; a module imported before the variable was set can then never run on CPU tensors. The kernels
here pick per launch instead, from the device of the tensor arguments:

* CUDA tensors -> ``triton.jit(fn)`` (compiled; interpreted only if ``TRITON_INTERPRET=1`` was set at import),
* CPU tensors  -> Triton's interpreter, whatever ``TRITON_INTERPRET`` says (compiled code cannot run there anyway).

Kernels decorated with it must not call other ``@triton.jit`` functions (the two modes cannot be mixed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


class Kernel:
    """Launch with ``kernel[grid](*args, **constexprs)`` exactly like a ``triton.jit`` function."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.jitted = triton.jit(fn)
        self._interpreted: InterpretedFunction | None = None

    @property
    def interpreted(self) -> InterpretedFunction:
        if self._interpreted is None:
            jitted = self.jitted
            self._interpreted = jitted if isinstance(jitted, InterpretedFunction) else InterpretedFunction(self.fn)
        return self._interpreted

    def for_device(self, on_cuda: bool):
        """The launchable object for CUDA (``True``) or CPU (``False``) arguments."""
        return self.jitted if on_cuda else self.interpreted

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            return self.for_device(on_cuda)[grid](*args, **kwargs)

        return launch


def jit(fn: Callable) -> Kernel:
    return Kernel(fn)
