"""Sequence log-probs log pi(y|x) of the Megatron model against a hand computation from
transformers' logits, their gradients, and greedy decoding against transformers' generate."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models import hf_convert
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.logprobs import greedy_decode, sequence_logprobs
from tests.helpers import spread_weights

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

# A right-padded batch: prompt lengths 2, 5, 3; total lengths 9, 7, 4 (S = 10).
PROMPT_LENS = torch.tensor([2, 5, 3])
LENGTHS = torch.tensor([9, 7, 4])




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


def _batch(seed=0, pad_id=0):
    tokens = torch.randint(1, SIZES["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(seed))
    tokens[torch.arange(10) >= LENGTHS[:, None]] = pad_id
    return tokens


def _hand_logprobs(hf_model, tokens):
    """sum_{t=prompt_len}^{length-1} log_softmax(logits[t-1])[token t], row by row, each row
    run alone and unpadded."""
    sums = []
    for b in range(tokens.size(0)):
        row = tokens[b : b + 1, : LENGTHS[b]]
        logp = torch.log_softmax(hf_model(row).logits[0].float(), dim=-1)
        sums.append(sum(logp[t - 1, row[0, t]] for t in range(PROMPT_LENS[b], LENGTHS[b])))
    return torch.stack(sums)


def test_sequence_logprobs_equal_the_hand_computation_over_response_tokens(pair):
    hf_model, model, _ = pair
    tokens = _batch()
    logp_sum, num_tokens = sequence_logprobs(model, tokens, PROMPT_LENS, LENGTHS)
    with torch.no_grad():
        expected = _hand_logprobs(hf_model, tokens)
    assert num_tokens.tolist() == [7, 2, 1]
    assert torch.allclose(logp_sum, expected, atol=1e-4, rtol=0)


def test_padding_tokens_do_not_change_the_logprobs(pair):
    _, model, _ = pair
    with torch.no_grad():
        a, _ = sequence_logprobs(model, _batch(pad_id=0), PROMPT_LENS, LENGTHS)
        b, _ = sequence_logprobs(model, _batch(pad_id=55), PROMPT_LENS, LENGTHS)
    assert torch.equal(a, b)


def test_logprob_gradients_equal_transformers_gradients(pair):
    hf_model, model, cfg = pair
    tokens = _batch(seed=1)
    weights = torch.tensor([1.0, -2.0, 0.5])  # a loss that weighs the rows differently
    model.zero_grad()
    hf_model.zero_grad()
    (weights * sequence_logprobs(model, tokens, PROMPT_LENS, LENGTHS)[0]).sum().backward()
    (weights * _hand_logprobs(hf_model, tokens)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    hf_grads = hf_convert.megatron_to_hf(grads, cfg)
    expected = {name: p.grad for name, p in hf_model.named_parameters() if name in hf_grads}
    assert expected.keys() == hf_grads.keys()
    for name, grad in expected.items():
        assert torch.allclose(hf_grads[name], grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("prompt_lens, lengths, message", [
    ([0, 5, 3], [9, 7, 4], "at least one token"),
    ([2, 5, 3], [9, 7, 11], "right padding"),
    ([2, 8, 3], [9, 7, 4], "prompt_lens"),
    ([2, 5], [9, 7], "shape"),
])
def test_inconsistent_spans_are_rejected(pair, prompt_lens, lengths, message):
    _, model, _ = pair
    with pytest.raises(ValueError, match=message):
        sequence_logprobs(model, _batch(), torch.tensor(prompt_lens), torch.tensor(lengths))


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
        full, _ = sequence_logprobs(model, _batch(), PROMPT_LENS, LENGTHS)
        half, _ = sequence_logprobs(bf16, _batch(), PROMPT_LENS, LENGTHS)
    assert half.dtype == torch.float32  # the log-softmax runs in fp32
    assert torch.allclose(half, full, atol=0.05 * 7, rtol=0)  # 7 response tokens at most
