"""The Megatron policy hands its weights to the rollout engine (refit), and training moves them:
after each refit the engine's greedy output equals greedy decoding with the policy itself."""
import pytest
import torch

from metaapo_nemo.data.batching import collate
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.logprobs import greedy_decode
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
from metaapo_nemo.rollout.engine import SamplingParams
from metaapo_nemo.rollout.torch_engine import TorchEngine

CFG = ModelConfig(vocab_size=61, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=96, max_position_embeddings=64)
EOS, PAD = 2, 0
PROMPTS = [[1, 5, 9, 12], [1, 7, 7, 30, 41, 3], [1, 44]]


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


def _policy_greedy(policy, max_new=12):
    return [greedy_decode(policy.model, p, max_new, EOS) for p in PROMPTS]


def _engine_greedy(engine, max_new=12):
    out = engine.generate(PROMPTS, SamplingParams(num_samples=1, greedy=True, max_new_tokens=max_new))
    return [samples[0] for samples in out]


def test_engine_greedy_equals_policy_greedy_after_refit_and_after_training():
    torch.manual_seed(0)
    policy = MegatronPolicy(CFG, None, pad_id=PAD, optim=OptimConfig(lr=3e-2))
    with torch.no_grad():  # spread the weights so greedy paths are not all the same token
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    engine = TorchEngine(CFG, eos_token_id=EOS, pad_token_id=PAD)
    engine.refit(policy.hf_state_dict())
    before = _engine_greedy(engine)
    assert before == _policy_greedy(policy)

    # A few optimiser steps pushing up the likelihood of one continuation change the greedy output.
    target = [(PROMPTS[0], [17, 18, 19, EOS])]

    def nll(seqs, logp, ntok):
        return -logp.sum(), {}

    for _ in range(30):
        policy.train_step(target, lambda seqs: collate(seqs, PAD), nll, micro_batch_size=1)
    trained = _policy_greedy(policy)
    assert trained[0][:4] == [17, 18, 19, EOS]
    assert _engine_greedy(engine) == before  # stale until refit
    engine.refit(policy.hf_state_dict())
    assert _engine_greedy(engine) == trained
