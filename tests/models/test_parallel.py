"""Two gloo ranks under torchrun: tensor parallelism (TP=2) and pipeline parallelism (PP=2, the
1F1B schedule) give transformers' numbers, on rows that pack a prompt's responses too, and
weights load into and export from the shards.

The test launches this file as its own worker (the `__main__` block) so the ranks share nothing
with the pytest process.
"""
from pathlib import Path

import torch

from tests.helpers import run_ranks

REPO = Path(__file__).resolve().parents[2]
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
PROMPT_LENS, LENGTHS = torch.tensor([2, 5, 3]), torch.tensor([9, 7, 4])


def test_tensor_and_pipeline_parallel_ranks_reproduce_transformers():
    run = run_ranks(2, __file__, timeout=240)
    assert run.stdout.count("ranks agree") == 2


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _hf_models():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)  # same weights on every rank
    models = [LlamaForCausalLM(LlamaConfig(**SIZES)),
              Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))]
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return [m.eval() for m in models]


def _batch():
    tokens = torch.randint(1, SIZES["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(1))
    tokens[torch.arange(10) >= LENGTHS[:, None]] = 0
    return tokens


def _sequences():
    """The batch's three sequences, and two more responses to the first prompt: collated, that
    prompt's row holds three responses behind a block mask (data.batching.collate)."""
    rows = [(t[:p].tolist(), t[p:n].tolist()) for t, p, n in zip(_batch(), PROMPT_LENS, LENGTHS)]
    more = torch.randint(1, SIZES["vocab_size"], (6,), generator=torch.Generator().manual_seed(2)).tolist()
    return rows + [(rows[0][0], more[:2]), (rows[0][0], more[2:])]


def _hand_logprobs(hf_model, sequences):
    """Each sequence run alone through transformers, its response tokens' log-probs summed."""
    sums = []
    for prompt, response in sequences:
        logp = torch.log_softmax(hf_model(torch.tensor([prompt + response])).logits[0], dim=-1)
        sums.append(sum(logp[t - 1, (prompt + response)[t]] for t in range(len(prompt), len(prompt + response))))
    return torch.stack(sums)


def _canonical(hf_model, cfg):
    return {k: v for k, v in hf_model.state_dict().items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")}


def _assert_exported_equals(model, cfg, hf_model):
    from metaapo_nemo.models.hf_convert import export_hf_state_dict

    exported, expected = export_hf_state_dict(model, cfg), _canonical(hf_model, cfg)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def _tensor_parallel_checks(hf_model):
    from metaapo_nemo.models import hf_convert
    from metaapo_nemo.models.gpt import build_gpt_model
    from metaapo_nemo.data.batching import collate
    from metaapo_nemo.models.logprobs import full_logits, sequence_logprobs

    cfg = hf_convert.model_config_from_hf(hf_model.config)
    model = build_gpt_model(cfg)
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    assert model.embedding.word_embeddings.weight.shape[0] == SIZES["vocab_size"] // 2  # sharded
    tokens = _batch()
    with torch.no_grad():
        assert (full_logits(model, tokens) - hf_model(tokens).logits).abs().max() <= 1e-4
    with torch.no_grad():  # one row per sequence, sharded
        alone = torch.cat([sequence_logprobs(model, collate([s], 0))[0] for s in _sequences()])
    # Masked rows, then one row by segments, each against one row per sequence (test_logprobs:
    # other groupings of float32 sums) and the hand-computed log-probs.
    masked = collate(_sequences(), 0, segments=False)
    assert masked.tokens.size(0) < 3 and masked.attention_mask is not None  # two prompts share a row
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(model, masked)[0], alone, atol=1e-4, rtol=0)
    batch = collate(_sequences(), 0, segments=True)
    assert batch.tokens.size(0) == 1 and batch.segments is not None
    logp_sum, _ = sequence_logprobs(model, batch)
    expected = _hand_logprobs(hf_model, _sequences())
    assert torch.allclose(logp_sum, expected, atol=1e-4, rtol=0)
    assert torch.allclose(logp_sum, alone, atol=1e-4, rtol=0)
    # Gradients: gather each parameter's shards as export does, compare in HF names.
    logp_sum.sum().backward()
    expected.sum().backward()
    grads = {hf_convert._full_name(model, n, cfg): hf_convert._gather_tensor_parallel(p.grad, p)
             for n, p in model.named_parameters()}
    for name, grad in hf_convert.megatron_to_hf(grads, cfg).items():
        assert torch.allclose(grad, dict(hf_model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4), name
    hf_model.zero_grad()
    _assert_exported_equals(model, cfg, hf_model)


def _pipeline_parallel_checks(hf_model):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from metaapo_nemo.models import hf_convert
    from metaapo_nemo.models.gpt import build_gpt_model
    from metaapo_nemo.data.batching import collate
    from metaapo_nemo.models.logprobs import decoder_hidden_states, response_logprobs

    cfg = hf_convert.model_config_from_hf(hf_model.config)
    last = parallel_state.is_pipeline_last_stage()
    model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(), post_process=last)
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    assert len(model.decoder.layers) == 1
    model.config.variable_seq_lengths = True  # the micro-batches differ in shape (as MegatronPolicy sets it)
    # Two micro-batches by segments, two with masked rows: every stage has the segments or the
    # mask, and the positions, of the micro-batch it runs.
    packed = [collate(_sequences(), 0, segments=by_segments) for by_segments in (True, False, True, False)]
    seen = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        hidden = decoder_hidden_states(model, batch.tokens, batch.position_ids, batch.attention_mask, batch.segments)
        if not last:
            return hidden, None
        logp_sum, _ = response_logprobs(model, hidden, batch)
        seen.append(logp_sum.detach())
        return logp_sum, lambda out: (-out.sum(), {"logp": out.detach()})

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(packed), model=[model],
        num_microbatches=4, seq_length=1, micro_batch_size=1, forward_only=False,
    )
    if last:
        expected = _hand_logprobs(hf_model, _sequences()).detach()
        assert len(seen) == 4 and all(torch.allclose(s, expected, atol=1e-4, rtol=0) for s in seen)
    _assert_exported_equals(model, cfg, hf_model)


def _worker():
    import torch.distributed as dist

    from metaapo_nemo.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    hf_models = _hf_models()
    init_distributed(tensor_model_parallel_size=2)
    for hf_model in hf_models:
        _tensor_parallel_checks(hf_model)
    init_distributed(pipeline_model_parallel_size=2)
    for hf_model in hf_models:
        _pipeline_parallel_checks(hf_model)
    print(f"rank {dist.get_rank()}: ranks agree", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    _worker()
