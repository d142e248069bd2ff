"""Sequence log-probs log pi(y|x) of the Megatron model against a hand computation from
transformers' logits, their gradients, packed rows (responses sharing a prompt) against one row
per sequence, and greedy decoding against transformers' generate."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from metaapo_nemo.data.batching import collate, pad_columns
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models import hf_convert
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.logprobs import greedy_decode, sequence_logprobs
from tests.helpers import spread_weights

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

# Three sequences: prompt lengths 2, 5, 3; total lengths 9, 7, 4 (one row each).
PROMPT_LENS = [2, 5, 3]
LENGTHS = [9, 7, 4]


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    """(transformers model, the same weights as a Megatron GPTModel, ModelConfig)."""
    if request.param == "llama":
        hf_model = LlamaForCausalLM(LlamaConfig(**SIZES))
    else:
        hf_model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))
    hf_model = spread_weights(hf_model, 0)
    cfg = hf_convert.model_config_from_hf(hf_model.config)
    model = build_gpt_model(cfg)
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    return hf_model, model, cfg


def _sequences(seed=0):
    tokens = torch.randint(1, SIZES["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(row[:p], row[p:n]) for row, p, n in zip(tokens, PROMPT_LENS, LENGTHS)]


def _batch(seed=0, pad_id=0):
    return collate(_sequences(seed), pad_id)


def _hand_logprobs(hf_model, sequences):
    """sum over t >= len(prompt) of log_softmax(logits[t-1])[token t], each sequence run alone
    and unpadded."""
    sums = []
    for prompt, response in sequences:
        row = torch.tensor([prompt + response])
        logp = torch.log_softmax(hf_model(row).logits[0].float(), dim=-1)
        sums.append(sum(logp[t - 1, row[0, t]] for t in range(len(prompt), row.size(1))))
    return torch.stack(sums)


def _shared_prompt_sequences():
    """A prompt with three responses of different lengths (one empty), one with a pair, one alone."""
    gen = torch.Generator().manual_seed(3)

    def draw(n):
        return torch.randint(1, SIZES["vocab_size"], (n,), generator=gen).tolist()
    a, b, c = draw(4), draw(2), draw(6)
    return [(a, draw(7)), (b, draw(3)), (a, draw(1)), (c, draw(5)), (b, draw(9)), (a, []), (a, draw(4))]


def test_sequence_logprobs_equal_the_hand_computation_over_response_tokens(pair):
    hf_model, model, _ = pair
    logp_sum, num_tokens = sequence_logprobs(model, _batch())
    with torch.no_grad():
        expected = _hand_logprobs(hf_model, _sequences())
    assert num_tokens.tolist() == [7, 2, 1]
    assert torch.allclose(logp_sum, expected, atol=1e-4, rtol=0)


def test_padding_tokens_do_not_change_the_logprobs(pair):
    _, model, _ = pair
    with torch.no_grad():
        a, _ = sequence_logprobs(model, _batch(pad_id=0))
        b, _ = sequence_logprobs(model, _batch(pad_id=55))
    assert torch.equal(a, b)


def test_logprob_gradients_equal_transformers_gradients(pair):
    hf_model, model, cfg = pair
    weights = torch.tensor([1.0, -2.0, 0.5])  # a loss that weighs the rows differently
    model.zero_grad()
    hf_model.zero_grad()
    (weights * sequence_logprobs(model, _batch(seed=1))[0]).sum().backward()
    (weights * _hand_logprobs(hf_model, _sequences(seed=1))).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    hf_grads = hf_convert.megatron_to_hf(grads, cfg)
    expected = {name: p.grad for name, p in hf_model.named_parameters() if name in hf_grads}
    assert expected.keys() == hf_grads.keys()
    for name, grad in expected.items():
        assert torch.allclose(hf_grads[name], grad, atol=1e-5, rtol=1e-4), name


# float32: the packed row computes the same terms as separate rows, in other groupings (a longer
# softmax over masked keys, other matmul shapes, other kernels on another CPU): the hidden states
# of 4 layers differ by ~1e-6 relative, and a sum of up to 9 log-probs of a few nats was measured
# 7.6e-6 apart here. 1e-4, the tolerance against transformers, leaves room for other rounding.
PACKED_ATOL = 1e-4


# The two layouts of a batch whose sequences share prompts: rows with a mask (an explicit
# row_capacity), and one row attended by segments (collate's default).
LAYOUTS = {"mask": dict(row_capacity=1.6), "segments": {}}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_rows_give_each_response_its_logprobs_alone(pair, layout):
    hf_model, model, _ = pair
    sequences = _shared_prompt_sequences()
    batch = collate(sequences, pad_id=0, **LAYOUTS[layout])
    if layout == "mask":
        # Three prompts in two rows: prompt a alone, then b and c (and their responses) in one row.
        assert batch.tokens.size(0) == 2 and batch.attention_mask is not None and (batch.prompt_starts > 0).any()
    else:  # every group in one row, no padding, no mask
        assert batch.tokens.size(0) == 1 and batch.attention_mask is None and batch.segments is not None
        assert batch.tokens.size(1) == batch.num_tokens
    with torch.no_grad():
        packed, num_tokens = sequence_logprobs(model, batch)
        alone = torch.cat([sequence_logprobs(model, collate([s], pad_id=0))[0] for s in sequences])
        hand = _hand_logprobs(hf_model, [s for s in sequences if s[1]])
    assert num_tokens.tolist() == [len(r) for _, r in sequences]
    assert packed[5] == 0  # the empty response
    assert torch.allclose(packed, alone, atol=PACKED_ATOL, rtol=0)
    assert torch.allclose(packed[[i for i, s in enumerate(sequences) if s[1]]], hand, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_rows_give_the_gradients_of_separate_rows(pair, layout):
    _, model, _ = pair
    sequences = _shared_prompt_sequences()
    weights = torch.linspace(-1.5, 2.0, len(sequences))

    def grads(batches):
        model.zero_grad()
        logp = torch.cat([sequence_logprobs(model, b)[0] for b in batches])
        (weights * logp).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}
    packed = grads([collate(sequences, pad_id=0, **LAYOUTS[layout])])
    separate = grads([collate([s], pad_id=0) for s in sequences])
    # Rounding relative to the tensor's scale: an entry near zero sums terms of the size of its
    # largest neighbours (the embedding's gradient reaches ~30 here; 2.7e-5 apart was measured).
    for name, grad in packed.items():
        scale = max(1.0, float(separate[name].abs().max()))
        assert float((grad - separate[name]).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_prompt_with_one_response_keeps_its_logprobs_in_a_packed_batch(pair, layout):
    _, model, _ = pair
    prompt, response = _shared_prompt_sequences()[0]
    with torch.no_grad():
        alone, _ = sequence_logprobs(model, collate([(prompt, response)], pad_id=0))
        # Packed beside another prompt's pair, the single response's row is masked and padded,
        # or its segments share one row with the pair's.
        mixed = collate([(prompt, response)] + _shared_prompt_sequences()[1:5:3], pad_id=0, **LAYOUTS[layout])
        assert (mixed.attention_mask is not None) == (layout == "mask") and mixed.tokens.size(1) > len(prompt + response)
        packed, _ = sequence_logprobs(model, mixed)
    assert torch.allclose(packed[0], alone[0], atol=PACKED_ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["one per row", *LAYOUTS])
def test_padded_columns_change_neither_logprobs_nor_gradients(pair, layout):
    """pad_columns (bf16 batches on the CPU): 13 more columns, the same values."""
    _, model, _ = pair
    sequences = _sequences() if layout == "one per row" else _shared_prompt_sequences()
    batch = collate(sequences, pad_id=0, **LAYOUTS.get(layout, {}))
    wide = pad_columns(batch, batch.tokens.size(1) + 13)
    assert wide.tokens.size(1) == batch.tokens.size(1) + 13 and pad_columns(wide, 1) is wide
    weights = torch.linspace(-1.5, 2.0, len(sequences))

    def run(b):
        model.zero_grad()
        logp = sequence_logprobs(model, b)[0]
        (weights * logp).sum().backward()
        return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}
    (logp, grads), (wide_logp, wide_grads) = run(batch), run(wide)
    assert torch.allclose(wide_logp, logp, atol=PACKED_ATOL, rtol=0)
    for name, grad in grads.items():
        scale = max(1.0, float(grad.abs().max()))
        assert float((wide_grads[name] - grad).abs().max()) <= 1e-5 * scale, name


def test_greedy_decode_matches_transformers_generate(pair):
    hf_model, model, _ = pair
    prompt = [5, 17, 42, 8]
    ours = greedy_decode(model, prompt, max_new_tokens=12, eos_token_id=None)
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()
    # Stopping: make the 4th generated token the eos; decoding ends with it.
    stopped = greedy_decode(model, prompt, max_new_tokens=12, eos_token_id=ours[3])
    assert stopped == ours[: ours.index(ours[3]) + 1]


def test_bf16_model_logprobs_stay_close_to_fp32(pair):
    _, model, cfg = pair
    bf16 = build_gpt_model(cfg, dtype=torch.bfloat16)
    hf_convert.load_hf_into_model(bf16, cfg, hf_convert.export_hf_state_dict(model, cfg))
    with torch.no_grad():
        full, _ = sequence_logprobs(model, _batch())
        half, _ = sequence_logprobs(bf16, _batch())
    assert half.dtype == torch.float32  # the log-softmax runs in fp32
    assert torch.allclose(half, full, atol=0.05 * 7, rtol=0)  # 7 response tokens at most
