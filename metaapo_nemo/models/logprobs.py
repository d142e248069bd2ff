"""Sequence log-probabilities log pi(y|x) of a Megatron GPTModel, and two slow references
(full logits, greedy decoding) for tests.

log pi(y|x) is the sum of the response tokens' log-probs, prompt tokens masked (METAAPO.md,
notation; the margin m and the scores of Eq. 4-5 are built from it). Two speed levers shape it
(ECOSYSTEM.md): batches are RIGHT-padded and run with no attention mask - causal attention
already keeps each real token from seeing the padding that follows it - and the LM head runs only
on the hidden states that predict response tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import unwrap_model


def _positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0).expand_as(tokens)


def decoder_hidden_states(model, tokens: Tensor) -> Tensor:
    """This pipeline stage's decoder output [S, B, H] for tokens [B, S], with no attention mask.

    The first stage embeds `tokens`; a later stage reads the activations its pipeline schedule
    passed in with `model.set_input_tensor` and uses `tokens` only for the sequence length. The
    last stage's output has the final norm applied.
    """
    gpt: GPTModel = unwrap_model(model)
    decoder_input = (
        gpt.embedding(input_ids=tokens, position_ids=_positions(tokens)) if gpt.pre_process else None
    )
    return gpt.decoder(
        hidden_states=decoder_input,
        attention_mask=None,
        rotary_pos_emb=gpt.rotary_pos_emb(tokens.size(1)),
    )


def _check_spans(tokens: Tensor, prompt_lens: Tensor, lengths: Tensor) -> None:
    batch, seq = tokens.shape
    if prompt_lens.shape != (batch,) or lengths.shape != (batch,):
        raise ValueError(
            f"prompt_lens {tuple(prompt_lens.shape)} and lengths {tuple(lengths.shape)} must both "
            f"have shape ({batch},), one entry per row of tokens"
        )
    if not bool(((1 <= prompt_lens) & (prompt_lens <= lengths) & (lengths <= seq)).all()):
        raise ValueError(
            "need 1 <= prompt_lens[b] <= lengths[b] <= tokens.size(1) for every row (a prompt of at "
            f"least one token, right padding); got prompt_lens={prompt_lens.tolist()}, "
            f"lengths={lengths.tolist()}, tokens.size(1)={seq}"
        )


def response_logprobs(
    model, hidden: Tensor, tokens: Tensor, prompt_lens: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum of response-token log-probs [B], number of response tokens [B]) from the last
    stage's decoder output `hidden` [S, B, H].

    Token t of row b is a response token iff prompt_lens[b] <= t < lengths[b]; hidden state t-1
    predicts it. Only those hidden states go through the LM head, and the log-prob comes from
    vocab_parallel_cross_entropy, so the vocabulary may be split over tensor-parallel ranks.
    """
    gpt: GPTModel = unwrap_model(model)
    _check_spans(tokens, prompt_lens, lengths)
    t = torch.arange(tokens.size(1), device=tokens.device)
    is_response = (t >= prompt_lens[:, None]) & (t < lengths[:, None])  # [B, S]
    rows, cols = is_response.nonzero(as_tuple=True)
    predicting = hidden[cols - 1, rows].unsqueeze(1)  # [N, 1, H], megatron's [s, b, h] layout
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(predicting, weight=weight)  # [N, 1, V / TP]
    # fp32 for the softmax: in bf16 the log-probs of a long response lose whole nats.
    nll = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float(), tokens[rows, cols].unsqueeze(1)
    ).squeeze(1)
    logp_sum = torch.zeros(tokens.size(0), dtype=nll.dtype, device=nll.device).index_add(
        0, rows, -nll
    )
    return logp_sum, is_response.sum(dim=1)


def _require_whole_model(gpt: GPTModel, what: str) -> None:
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError(
            f"{what} needs the whole model on this rank (pipeline_model_parallel_size=1); under "
            "pipeline parallelism compose decoder_hidden_states and response_logprobs in the "
            "schedule's forward step"
        )


def sequence_logprobs(
    model, tokens: Tensor, prompt_lens: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """log pi(y|x) for a right-padded batch: (logp_sum [B], num_tokens [B]).

    tokens [B, S] holds prompt x then response y in positions [0, lengths[b]), padding after;
    logp_sum[b] = sum_{t = prompt_lens[b]}^{lengths[b] - 1} log p(tokens[b, t] | tokens[b, <t]).
    Differentiable; num_tokens[b] = lengths[b] - prompt_lens[b] (for SimPO's mean, Eq. A.9).
    """
    gpt: GPTModel = unwrap_model(model)
    _require_whole_model(gpt, "sequence_logprobs")
    device = gpt.embedding.word_embeddings.weight.device
    tokens, prompt_lens, lengths = (x.to(device) for x in (tokens, prompt_lens, lengths))
    return response_logprobs(model, decoder_hidden_states(model, tokens), tokens, prompt_lens, lengths)


def full_logits(model, tokens: Tensor) -> Tensor:
    """Logits [B, S, V] at every position through GPTModel's own forward (causal, no mask),
    gathered over tensor-parallel ranks. A reference path: training uses sequence_logprobs."""
    gpt: GPTModel = unwrap_model(model)
    _require_whole_model(gpt, "full_logits")
    tokens = tokens.to(gpt.embedding.word_embeddings.weight.device)
    return gpt(tokens, _positions(tokens), None, runtime_gather_output=True)


@torch.no_grad()
def greedy_decode(
    model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None
) -> list[int]:
    """Greedy continuation of one prompt by re-running the whole sequence each step (slow,
    reference only). Returns the new tokens, ending with eos_token_id if it was produced."""
    if not prompt_ids:
        raise ValueError("greedy_decode needs a prompt of at least one token")
    tokens = torch.tensor([prompt_ids], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(full_logits(model, tokens)[0, -1].argmax())
        new.append(next_id)
        if next_id == eos_token_id:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return new
