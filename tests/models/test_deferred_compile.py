"""megatron-core imported without TorchInductor (metaapo_nemo/models/megatron_core.py): its fused
functions compile at their first call, as torch.compile would, and torch.compile is left as it was."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from metaapo_nemo.models.megatron_core import _deferred_compile

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_models_loads_megatron_without_inductor_and_restores_torch_compile():
    code = ("import sys, torch; real = torch.compile\n"
            "from metaapo_nemo.models import policy, gpt, logprobs\n"
            "from metaapo_nemo.algorithm import metaapo\n"
            "import megatron.core.jit as jit\n"
            "print('torch._inductor' in sys.modules, torch.compile is real, jit.jit_fuser.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "_deferred_compile"]


def test_a_deferred_compile_compiles_at_the_first_call_with_its_options():
    calls = []

    def backend(graph, example_inputs):  # a torch.compile backend that records and runs the graph
        calls.append(len(example_inputs))
        return graph.forward

    def f(x):
        return torch.sin(x) * 2 + 1

    def g(x):  # another code object: dynamo caches compiled code per function
        return torch.sin(x) * 2 + 1

    for deferred in (_deferred_compile(f, backend=backend), _deferred_compile(backend=backend)(g)):
        before = len(calls)
        assert deferred.__name__ in ("f", "g")
        x = torch.linspace(-1, 1, 7)
        assert torch.equal(deferred(x), f(x)) and len(calls) == before + 1  # compiled by then, once
        deferred(x)
        assert len(calls) == before + 1
