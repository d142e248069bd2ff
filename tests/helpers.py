"""Small things several test files share."""
import torch

# The embedded task and the loop shrunk so a whole run takes seconds (tests of the full pipeline).
SHRUNK_TINY_CPU = ["task.sft_steps=40", "task.sft_examples=1024", "task.num_train_pairs=96", "task.num_eval_prompts=16",
                   "task.warmup_dpo_steps=4", "algo.iterations=2", "algo.meta_interval=1", "trainer.global_batch_size=8",
                   "trainer.micro_batch_size=4", "rollout.eval_samples=2"]


def spread_weights(model: torch.nn.Module, seed: int, scale: float = 0.15, norm_scale: float = 0.1) -> torch.nn.Module:
    """HF's 0.02-std init gives near-uniform logits; wider weights make parity tests bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + norm_scale * noise if "norm" in name else scale * noise)
    return model.eval()


def free_port() -> int:
    """A local TCP port nobody holds right now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(nproc: int, *args: str, timeout: int = 300):
    """`python -m torch.distributed.run --standalone --nproc-per-node NPROC *args`, one torch
    thread per rank, the repository on the path; fails the test with the output's tail."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # --standalone: torchrun's own store binds port 0 itself, so no port is picked here and then
    # lost to another process before torchrun binds it (free_port's race).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
