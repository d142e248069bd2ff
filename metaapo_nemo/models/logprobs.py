"""Sequence log-probabilities log pi(y|x) of a Megatron GPTModel, and two slow references
(full logits, greedy decoding) for tests.

log pi(y|x) is the sum of the response tokens' log-probs, prompt tokens masked (METAAPO.md,
notation; the margin m and the scores of Eq. 4-5 are built from it). Three speed levers shape it
(ECOSYSTEM.md): the responses that share a prompt share one row, so the prompt is computed once
(data.batching.collate: a block mask or attention by segments, and positions that restart after
the prompt); rows are RIGHT-padded, so a batch of one response per row runs with no mask at all; and the LM head runs
only on the hidden states that predict response tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from metaapo_nemo.models import megatron_core  # noqa: F401  (first: megatron-core without TorchInductor)
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import unwrap_model

from metaapo_nemo.data.batching import Segments, SequenceBatch
from metaapo_nemo.models.gpt import SegmentedAttention


def _positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0).expand_as(tokens)


def decoder_hidden_states(
    model, tokens: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
    segments: Segments | None = None,
) -> Tensor:
    """This pipeline stage's decoder output [S, B, H] for tokens [B, S].

    position_ids [B, S]: each token's rotary position (None: 0..S-1 in every row); attention_mask
    [B, 1, S, S], True = masked out (None: causal only); or `segments`, attention by segments
    (data.batching.Segments) in place of a mask. A SequenceBatch carries all three. The first
    stage embeds `tokens`; a later stage reads the activations its pipeline schedule passed in
    with `model.set_input_tensor` and uses `tokens` only for the shape: every stage needs the same
    positions and mask. The last stage's output has the final norm applied.
    """
    gpt: GPTModel = unwrap_model(model)
    positions = _positions(tokens) if position_ids is None else position_ids
    decoder_input = gpt.embedding(input_ids=tokens, position_ids=positions) if gpt.pre_process else None
    # rotary_pos_emb(n) holds the frequencies of positions 0..n-1 as [n, 1, 1, D]; gathered per token
    # into [S, B, 1, D], which megatron's apply_rotary_pos_emb broadcasts over the heads.
    freqs = gpt.rotary_pos_emb(int(positions.max()) + 1)[:, 0][positions.t()]
    packed = None if segments is None else SegmentedAttention(segments=segments)
    return gpt.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=freqs,
                       packed_seq_params=packed)


def response_logprobs(model, hidden: Tensor, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """(sum of response-token log-probs [N], number of response tokens [N]), one entry per
    sequence of `batch` in its order, from the last stage's decoder output `hidden` [S, B, H].

    Hidden state t-1 of a row predicts its token t, except that a response's first token is
    predicted by its prompt's last token. Only those hidden states go through the LM head, and
    the log-prob comes from vocab_parallel_cross_entropy, so the vocabulary may be split over
    tensor-parallel ranks.
    """
    gpt: GPTModel = unwrap_model(model)
    response_lens = batch.lengths - batch.prompt_lens
    which = torch.repeat_interleave(torch.arange(len(response_lens), device=hidden.device), response_lens)  # [T]
    first = (torch.cumsum(response_lens, 0) - response_lens)[which]
    offset = torch.arange(which.numel(), device=hidden.device) - first  # the token's place in its response
    rows, cols = batch.rows[which], batch.starts[which] + offset
    predictors = torch.where(offset == 0, batch.prompt_starts[which] + batch.prompt_lens[which] - 1, cols - 1)
    predicting = hidden[predictors, rows].unsqueeze(1)  # [T, 1, H], megatron's [s, b, h] layout
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(predicting, weight=weight)  # [T, 1, V / TP]
    # fp32 for the softmax: in bf16 the log-probs of a long response lose whole nats.
    nll = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float(), batch.tokens[rows, cols].unsqueeze(1)
    ).squeeze(1)
    logp_sum = torch.zeros(len(response_lens), dtype=nll.dtype, device=nll.device).index_add(0, which, -nll)
    return logp_sum, response_lens


def _require_whole_model(gpt: GPTModel, what: str) -> None:
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError(
            f"{what} needs the whole model on this rank (pipeline_model_parallel_size=1); under "
            "pipeline parallelism compose decoder_hidden_states and response_logprobs in the "
            "schedule's forward step"
        )


def sequence_logprobs(model, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
    """log pi(y|x) for every sequence of a collated batch: (logp_sum [N], num_tokens [N]).

    logp_sum[n] = sum over the response tokens y_t of sequence n of log p(y_t | x, y_<t).
    Differentiable; num_tokens[n] = lengths[n] - prompt_lens[n] (for SimPO's mean, Eq. A.9).
    """
    gpt: GPTModel = unwrap_model(model)
    _require_whole_model(gpt, "sequence_logprobs")
    batch = batch.to(gpt.embedding.word_embeddings.weight.device)
    hidden = decoder_hidden_states(model, batch.tokens, batch.position_ids, batch.attention_mask, batch.segments)
    return response_logprobs(model, hidden, batch)


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
