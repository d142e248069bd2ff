"""megatron-core, imported once for every module of this package that uses it (they import this
module first).

Importing megatron-core decorates some 40 fused element-wise functions with ``torch.compile``
(``megatron.core.jit.jit_fuser``), and the first ``torch.compile`` call imports TorchInductor:
2-4 s of every process's start on a CPU, for functions a run calls only with bias fusion on, if
ever. Here megatron-core is imported with a ``torch.compile`` that defers itself to a function's
first call, which is when torch compiles anyway; ``jit_fuser`` keeps that deferring form for the
megatron modules imported later. ``torch.compile`` itself is restored at once.
"""
from __future__ import annotations

import functools

import torch


def _deferred_compile(model=None, **options):
    """torch.compile(model, **options), done at the first call of the result (torch.compile's own
    laziness, without its imports up front); used as a bare decorator or with options alike."""
    if model is None:
        return lambda fn: _deferred_compile(fn, **options)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = _real_compile(model, **options)
        return compiled(*args, **kwargs)
    return call


_real_compile = torch.compile
torch.compile = _deferred_compile
try:
    import megatron.core  # noqa: F401  (megatron.core.jit picks its jit_fuser now)
finally:
    torch.compile = _real_compile
