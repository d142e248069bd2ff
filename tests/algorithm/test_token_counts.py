"""What summary.json's tokens and tokens/s count (metaapo.TOKEN_COUNTS), checked against a
hand-counted batch through the policy's train step and against the summary's own keys."""
from pathlib import Path

import pytest
import torch

from metaapo_nemo.algorithm.metaapo import TOKEN_COUNTS, MetaAPORun, RunState
from metaapo_nemo.algorithm.objectives import Objective
from metaapo_nemo.algorithm.strategies import resolve_strategy
from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.data.batching import collate
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=2,
                  ffn_hidden_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def distributed():
    init_distributed()


def test_train_step_counts_each_prompt_once_per_micro_batch_every_response_token_and_no_padding():
    torch.manual_seed(0)
    policy = MegatronPolicy(CFG, None, pad_id=0, optim=OptimConfig(lr=1e-3, clip_grad=0.0))
    # Two pairs as the loop trains them: chosen rows, then rejected rows. Prompts of 3 and 2 tokens,
    # responses (eos included) of 2 and 4 (chosen), 1 and 3 (rejected).
    p1, p2 = [1, 5, 6], [1, 7]
    rows = [(p1, [8, 2]), (p2, [9, 9, 10, 2]), (p1, [2]), (p2, [11, 12, 2])]

    def loss_fn(items, logp, ntok):
        return -logp.sum(), {"response_tokens": float(ntok.sum())}

    # One micro-batch: each prompt once, its two responses packed behind it: (3 + 2 + 1) + (2 + 4 + 3)
    # = 15 tokens; the rows are padded to 9 columns (3 pads), not counted.
    st = policy.train_step(rows, lambda items: collate(items, 0), loss_fn, micro_batch_size=4)
    assert st["tokens"] == 15 and st["response_tokens"] == 2 + 4 + 1 + 3
    # Micro-batches of 2 split each prompt's responses apart: every prompt counts twice,
    # (3 + 2) + (2 + 4) + (3 + 1) + (2 + 3) = 20.
    st = policy.train_step(rows, lambda items: collate(items, 0), loss_fn, micro_batch_size=2)
    assert st["tokens"] == 20


def test_summary_says_what_each_token_count_counts(tmp_path: Path):
    run = MetaAPORun.__new__(MetaAPORun)
    run.config, run.out, run.warnings = MetaAPOConfig(), tmp_path, []
    run.strategy, run.objective = resolve_strategy("metaapo", None), Objective("dpo", beta=0.1)
    run.state = RunState(train_tokens=300, generated_tokens=90)
    run.state.seconds.update(training=2.0, sampling=3.0)
    summary = run._summary(finished=True)
    assert summary["tokens"] == {"training": 300, "generation": 90}
    assert summary["tokens_per_second"]["training"] == 150 and summary["tokens_per_second"]["generation"] == 30
    assert summary["tokens_per_second"]["counts"] == TOKEN_COUNTS
    assert set(TOKEN_COUNTS) == set(summary["tokens"]) and "padding excluded" in TOKEN_COUNTS["training"]
