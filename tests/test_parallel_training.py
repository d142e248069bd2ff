"""Tensor, pipeline and data parallelism against one process, on real gloo ranks under torchrun:
the same per-pair log-probs (policy and reference), the same Eq. 5 loss, grad norm and weights
over 3 optimiser steps, the meta-learner stepped on rank 0 (buffers gathered from every
data-parallel rank) identical on every rank and equal to the single-process run, and the rollout
engine refit from the sharded policy equal on every rank to the single-process one.

The test launches this file as its own worker (the `__main__` block) with 1 and with 2 ranks.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_ranks

ROOT = Path(__file__).resolve().parents[1]
STEPS, GLOBAL_BATCH, MICRO_BATCH, PAIRS = 3, 8, 2, 16


def _launch(nproc: int, tp: int, pp: int, out: Path) -> dict:
    run_ranks(nproc, __file__, str(tp), str(pp), str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(1, 1, 1, tmp_path_factory.mktemp("single") / "out.json")


@pytest.mark.parametrize("tp, pp, layout", [(2, 1, "TP=2"), (1, 2, "PP=2"), (1, 1, "DP=2")])
def test_two_ranks_reproduce_the_single_process_run(single, tmp_path, tp, pp, layout):
    parallel = _launch(2, tp, pp, tmp_path / "out.json")
    assert parallel["data_parallel_size"] == (2 if layout == "DP=2" else 1)
    for key in ("reference_logps", "policy_logps_before", "policy_logps_after"):
        diff = (torch.tensor(parallel[key]) - torch.tensor(single[key])).abs().max().item()
        assert diff <= 1e-5, f"{layout}: {key} differ by {diff}"
    assert len(parallel["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(parallel["losses"], single["losses"])):
        assert a == pytest.approx(b, abs=1e-6), f"{layout}: loss of step {step + 1}"
    for step, (a, b) in enumerate(zip(parallel["grad_norms"], single["grad_norms"])):
        assert a == pytest.approx(b, rel=1e-5), f"{layout}: grad norm of step {step + 1}"
    assert parallel["meta_identical_on_all_ranks"] == [True] * STEPS
    for step, (a, b) in enumerate(zip(parallel["meta_params"], single["meta_params"])):
        diff = (torch.tensor(a) - torch.tensor(b)).abs().max().item()
        assert diff <= 1e-6, f"{layout}: meta-learner after step {step + 1} differs by {diff}"
    assert single["meta_params"][0] != single["meta_params"][-1]  # the meta-learner really moved
    assert parallel["meta_buffer_pairs"] == single["meta_buffer_pairs"] == [GLOBAL_BATCH] * STEPS
    # Rollout refit after training: every rank's engine has the trained weights of the 1-rank run.
    assert parallel["refit_identical_on_all_ranks"]
    assert parallel["refit_greedy"] == single["refit_greedy"]
    diff = max((torch.tensor(a) - torch.tensor(b)).abs().max().item()
               for a, b in zip(parallel["refit_logits"], single["refit_logits"]))
    assert diff <= 1e-5, f"{layout}: refit engine logits differ by {diff}"


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _worker(tp: int, pp: int, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.algorithm.meta_learner import (
        MetaBuffer,
        MetaLearner,
        make_meta_optimizer,
    )
    from metaapo_nemo.algorithm.metaapo import meta_step_on_rank0
    from metaapo_nemo.algorithm.objectives import (
        Objective,
        PairLogps,
        meta_weighted_loss,
    )
    from metaapo_nemo.algorithm.strategies import loss_weights, resolve_strategy
    from metaapo_nemo.data.batching import collate
    from metaapo_nemo.distributed import (
        all_gather_objects,
        data_parallel_size,
        init_distributed,
        is_loss_rank,
        world_rank,
    )
    from metaapo_nemo.models.hf_convert import model_config_from_hf
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
    from metaapo_nemo.rollout.engine import SamplingParams
    from metaapo_nemo.rollout.torch_engine import TorchEngine
    from tests.helpers import spread_weights

    torch.set_num_threads(1)
    init_distributed(tp, pp, seed=0)
    torch.manual_seed(0)
    hf = spread_weights(LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)), seed=0)
    cfg, weights = model_config_from_hf(hf.config), hf.state_dict()
    policy = MegatronPolicy(cfg, weights, pad_id=0, optim=OptimConfig(lr=5e-3, clip_grad=1.0))
    reference = MegatronPolicy(cfg, weights, pad_id=0)

    gen = torch.Generator().manual_seed(1)

    def tokens(lo, hi):
        return torch.randint(3, 64, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()

    pairs = [dict(prompt=tokens(2, 7), off=(tokens(1, 6), tokens(1, 6)), on=(tokens(1, 6), tokens(1, 6)))
             for _ in range(PAIRS)]
    offline = [(p["prompt"], p["off"][0]) for p in pairs] + [(p["prompt"], p["off"][1]) for p in pairs]
    online = [(p["prompt"], p["on"][0]) for p in pairs] + [(p["prompt"], p["on"][1]) for p in pairs]
    ref_off, ref_on = reference.score(offline)[0], reference.score(online)[0]
    policy_before = policy.score(offline)[0]

    objective, strategy = Objective("dpo", beta=0.1), resolve_strategy("metaapo")
    meta, buffer = MetaLearner(), MetaBuffer()
    meta_optimizer = make_meta_optimizer(meta) if world_rank() == 0 else None

    def make_batch(idx):
        return collate([offline[i] for i in idx] + [offline[i + PAIRS] for i in idx]
                       + [online[i] for i in idx] + [online[i + PAIRS] for i in idx], 0)

    def loss_fn(idx, logp, ntok):
        b = len(idx)
        off = PairLogps(logp[:b], logp[b:2 * b], ref_off[idx], ref_off[[i + PAIRS for i in idx]])
        on = PairLogps(logp[2 * b:3 * b], logp[3 * b:], ref_on[idx], ref_on[[i + PAIRS for i in idx]])
        loss_off, loss_on, score_off = objective.loss(off), objective.loss(on), objective.score(off).detach()
        w_off, w_on = loss_weights(strategy, meta, score_off)
        if is_loss_rank():
            buffer.add(score_off, loss_off.detach(), loss_on.detach())
        loss = meta_weighted_loss(w_off, w_on, loss_off, loss_on) * b
        return loss, {"loss": float(loss)}

    result = {"losses": [], "grad_norms": [], "meta_params": [], "meta_identical_on_all_ranks": [],
              "meta_buffer_pairs": []}
    for step in range(STEPS):
        items = [(step * GLOBAL_BATCH + j) % PAIRS for j in range(GLOBAL_BATCH)]
        stats = policy.train_step(items, make_batch, loss_fn, MICRO_BATCH)
        result["losses"].append(stats["loss"] / GLOBAL_BATCH)
        result["grad_norms"].append(stats["grad_norm"])
        meta_stats = meta_step_on_rank0(meta, meta_optimizer, buffer)
        flat = torch.cat([p.detach().flatten() for p in meta.parameters()]).tolist()
        result["meta_identical_on_all_ranks"].append(all(other == flat for other in all_gather_objects(flat)))
        result["meta_params"].append(flat)
        result["meta_buffer_pairs"].append(all_gather_objects(meta_stats.get("meta_buffer_pairs"))[0])
    # Refit: the engine gets complete weights (stages gathered, shards joined) on every rank.
    engine = TorchEngine(cfg, eos_token_id=2, pad_token_id=0)
    engine.refit(policy.hf_state_dict())
    prompts = [p["prompt"] for p in pairs[:4]]
    greedy = engine.generate(prompts, SamplingParams(num_samples=1, greedy=True, max_new_tokens=8))
    logits = [t.tolist() for t in engine.prompt_logits(prompts)]
    result["refit_identical_on_all_ranks"] = all(g == (greedy, logits) for g in all_gather_objects((greedy, logits)))
    result.update(refit_greedy=greedy, refit_logits=logits)
    result.update(reference_logps=ref_off.tolist() + ref_on.tolist(), policy_logps_before=policy_before.tolist(),
                  policy_logps_after=policy.score(offline)[0].tolist(), data_parallel_size=data_parallel_size())
    if world_rank() == 0:
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
