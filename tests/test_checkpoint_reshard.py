"""Checkpoints in Megatron's distributed format reshard: a policy trained and saved by 2 ranks at
TP=2 loads on 1 rank, at DP=2 and at PP=2 with exactly the saved weights and Adam moments, and
trains on; a whole run stopped after iteration 1 on 2 ranks (TP=2, DP=2) resumes on 1 rank and
finishes, its meta buffer carried over.

The policy test launches this file as its own worker (the `__main__` block) on 1 and 2 ranks.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import SHRUNK_TINY_CPU, run_ranks

ROOT = Path(__file__).resolve().parents[1]
PAIRS, MICRO_BATCH = 8, 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 ranks, TP=2: two optimiser steps, then a checkpoint; what was saved, as full tensors."""
    directory = tmp_path_factory.mktemp("tp2")
    run_ranks(2, __file__, "save", "2", "1", str(directory / "checkpoint"), str(directory / "saved.pt"))
    return directory


@pytest.mark.parametrize("nproc, tp, pp, layout", [(1, 1, 1, "1 rank"), (2, 1, 1, "DP=2"), (2, 1, 2, "PP=2")])
def test_a_tp2_checkpoint_loads_exactly_under_another_layout_and_trains_on(saved, tmp_path, nproc, tp, pp, layout):
    run_ranks(nproc, __file__, "load", str(tp), str(pp), str(saved / "checkpoint"), str(tmp_path / "loaded.pt"))
    before, after = (torch.load(d / f, weights_only=True) for d, f in ((saved, "saved.pt"), (tmp_path, "loaded.pt")))
    assert after["data_parallel_size"] == nproc // (tp * pp)
    for part in ("weights", "exp_avg", "exp_avg_sq"):
        assert before[part].keys() == after[part].keys()
        unequal = [k for k in before[part] if not torch.equal(before[part][k], after[part][k])]
        assert not unequal, f"{layout}: {part} differs in {unequal}"
    assert before["adam_steps"] == after["adam_steps"] == 2
    assert after["exp_avg_sq"]["model.embed_tokens.weight"].abs().max() > 0  # the moments were really saved
    # The next step starts from the same weights: its loss agrees to rounding (another layout
    # adds up in another order), and it moves the weights.
    assert after["loss_of_next_step"] == pytest.approx(before["loss_of_next_step"], rel=1e-5)
    assert after["moved_by_next_step"] > 0


def test_a_policy_saved_before_its_first_step_loads_and_trains(tmp_path):
    from metaapo_nemo.distributed import init_distributed

    init_distributed()
    _policy(weights_seed=0).save_checkpoint(tmp_path)  # no Adam moments yet: an iteration with nothing to train on
    policy = _policy(weights_seed=1)
    policy.load_checkpoint(tmp_path)
    saved = _policy(weights_seed=0).hf_state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in policy.hf_state_dict().items())
    assert _train_step(policy) > 0


# ------------------------------------------------------------------------------------------
# A whole run: stopped after iteration 1 on 2 ranks (TP=2, or DP=2 where both ranks hold part of
# the meta buffer), resumed on 1 rank. T_meta = 3 and 4 optimiser steps per iteration leave the
# checkpoint with one step in the meta buffer, which the resumed run's first Eq. 6 step must use.


def _run_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}", f"task.cache_dir={cache}",
            *SHRUNK_TINY_CPU, "algo.meta_interval=3", *extra]


@pytest.mark.parametrize("layout, saved_layout, extra", [
    ("TP=2", "TP=2 PP=1 DP=1", ["trainer.tensor_model_parallel_size=2"]),
    ("DP=2", "TP=1 PP=1 DP=2", []),
])
def test_a_run_stopped_on_two_ranks_resumes_on_one_rank_and_finishes(tmp_path, layout, saved_layout, extra):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # one log line a line
    with open(tmp_path / "two_ranks.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 *_run_args(out, cache, *extra)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        latest, deadline = out / "checkpoints" / "latest", time.time() + 600
        while not (latest.exists() and latest.read_text() == "iter_1"):
            ended = proc.poll() is not None
            assert not ended and time.time() < deadline, (tmp_path / "two_ranks.log").read_text()[-3000:]
            time.sleep(0.2)
        # As a preempted job stops: torchrun passes SIGTERM on to both ranks (each in its own
        # session, out of reach of a kill of torchrun's group); the reward server ends with rank 0.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert not json.loads((out / "summary.json").read_text())["finished"], "stopped too late: iteration 2 ended"
    checkpoint = out / "checkpoints" / "iter_1"
    assert (checkpoint / "policy" / "metadata.json").exists()
    run_state = torch.load(checkpoint / "run_state.pt", weights_only=True)
    assert "TP={tensor} PP={pipeline} DP={data}".format(**run_state["layout"]) == saved_layout
    assert sorted(run_state["rng"]) == [0, 1]
    assert sum(b["score_off"].numel() for b in run_state["meta_buffers"]) > 0

    if layout == "TP=2":  # the optimizer kind cannot change across a resume: refused in one line
        flipped = subprocess.run([sys.executable, *_run_args(out, cache, "trainer.use_distributed_optimizer=true")],
                                 capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert flipped.returncode == 2, flipped.stdout[-3000:] + flipped.stderr[-3000:]
        assert "Traceback" not in flipped.stderr
        assert "saved with trainer.use_distributed_optimizer=false: resume with the same setting" in \
            flipped.stderr.strip().splitlines()[-1]
    resumed = subprocess.run([sys.executable, *_run_args(out, cache)], capture_output=True, text=True, timeout=600,
                             cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resharding from {saved_layout} to TP=1 PP=1 DP=1" in resumed.stdout
    assert "RNG: rank 0's state on every rank (saved by 2 ranks, resumed by 1)" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["iterations"] == 2
    assert summary["parallel"] == {"ranks": 1, "tensor": 1, "pipeline": 1, "data": 1}
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert (out / "checkpoints" / "latest").read_text() == "iter_2" and len(kept) == 3, kept  # and the one before
    # Every Eq. 6 step, the one across the resume included, used the pairs of every policy step
    # since the previous one (every trained pair of MetaAPO has an online pair).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pending, meta_steps = 0, 0
    for row in rows:
        if row["event"] == "train_step":
            pending += row["pairs"]
        elif row["event"] == "meta_update":
            assert row["meta_buffer_pairs"] == pending, f"{layout}: meta update at step {row['step']}"
            pending, meta_steps = 0, meta_steps + 1
    assert meta_steps == summary["meta_updates"] >= 2


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _hf_layout_of_adam_moments(policy) -> dict[str, dict[str, torch.Tensor]]:
    """exp_avg and exp_avg_sq of every parameter as full tensors under Hugging Face names: the
    parameters' data swapped for the moment and exported like the weights (shards joined, stages
    gathered), so that layouts with different shards compare tensor by tensor."""
    from metaapo_nemo.models.hf_convert import export_hf_state_dict

    optimizers = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    state = {p: s for opt in optimizers for p, s in opt.optimizer.state.items()}
    params = list(policy.model.parameters())
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        data = [p.data for p in params]
        for p in params:
            p.data = state[p][key]
        moments[key] = {k: v.clone() for k, v in export_hf_state_dict(policy.model, policy.cfg).items()}
        for p, d in zip(params, data):
            p.data = d
    moments["adam_steps"] = {int(s["step"]) for s in state.values()}.pop()
    return moments


def _policy(weights_seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.models.hf_convert import model_config_from_hf
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
    from tests.helpers import spread_weights

    hf = spread_weights(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), seed=weights_seed)
    return MegatronPolicy(model_config_from_hf(hf.config), hf.state_dict(), pad_id=0,
                          optim=OptimConfig(lr=5e-3, clip_grad=1.0))


def _train_step(policy) -> float:
    """One optimiser step on the summed log-likelihood of fixed sequences; returns its loss."""
    from metaapo_nemo.data.batching import collate

    gen = torch.Generator().manual_seed(1)
    sequences = [(torch.randint(3, 64, (3 + i % 3,), generator=gen).tolist(),
                  torch.randint(3, 64, (2 + i % 4,), generator=gen).tolist()) for i in range(PAIRS)]
    stats = policy.train_step(list(range(PAIRS)), lambda idx: collate([sequences[i] for i in idx], 0),
                              lambda idx, logp, ntok: (-logp.sum(), {"loss": float(-logp.sum())}), MICRO_BATCH)
    return stats["loss"]


def _worker(phase: str, tp: int, pp: int, checkpoint: str, out: str) -> None:
    from metaapo_nemo.distributed import barrier, data_parallel_size, init_distributed, world_rank

    torch.set_num_threads(1)
    init_distributed(tp, pp, seed=0)
    # The loading side starts from other weights, so only the checkpoint can make them equal.
    policy = _policy(weights_seed=0 if phase == "save" else 1)
    if phase == "save":
        _train_step(policy), _train_step(policy)
        if world_rank() == 0:
            Path(checkpoint).mkdir()
        barrier()
        policy.save_checkpoint(checkpoint)
    else:
        policy.load_checkpoint(checkpoint)
    result = {"weights": {k: v.clone() for k, v in policy.hf_state_dict().items()}, **_hf_layout_of_adam_moments(policy),
              "data_parallel_size": data_parallel_size()}
    result["loss_of_next_step"] = _train_step(policy)
    result["moved_by_next_step"] = max((v - result["weights"][k]).abs().max().item()
                                       for k, v in policy.hf_state_dict().items())
    if world_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
