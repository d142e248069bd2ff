"""Tokenizing prompts and responses, truncating them, and padding them into a batch.

A sequence is ``prompt_ids + response_ids``; the sequence log-prob log pi(y|x) counts the response
tokens only. The sequences of a batch that share a prompt (a pair's chosen and rejected, an item's
offline and online responses) share one row: the prompt once, then each response, kept apart by an
attention mask (ECOSYSTEM.md, speed levers: the prompt computed once). Rows are right-padded, and
a batch whose rows each hold one response needs no mask at all: causal attention keeps every real
token from seeing the padding that follows it.
"""

from dataclasses import dataclass, fields, replace

import torch


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    With a chat template the prompt (a string becomes one user message) is rendered with the
    generation prompt appended; the template writes its own special tokens, so none are added on
    top. Without one the prompt must be a string: its text, after the tokenizer's bos if it has one.
    """
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    if not isinstance(prompt, str):
        raise ValueError(
            "the prompt is a list of chat messages but the tokenizer has no chat template; "
            "use a tokenizer with a chat_template or give prompts as strings"
        )
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response: its text without special tokens, then eos (the model must learn
    to stop)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before encoding responses")
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def truncate(
    prompt_ids: list[int], response_ids: list[int], max_prompt_len: int, max_len: int
) -> tuple[list[int], list[int], bool]:
    """Fit a sequence into ``max_len`` tokens with at most ``max_prompt_len`` of prompt.

    The prompt keeps its END (the question nearest the answer matters most), the response keeps
    its start. Returns the two parts and whether anything was cut.
    """
    if not 0 < max_prompt_len < max_len:
        raise ValueError(
            f"need 0 < max_prompt_len < max_len to leave room for a response, got {max_prompt_len} and {max_len}"
        )
    kept_prompt = prompt_ids[-max_prompt_len:]
    kept_response = response_ids[: max_len - len(kept_prompt)]
    truncated = len(kept_prompt) < len(prompt_ids) or len(kept_response) < len(response_ids)
    return kept_prompt, kept_response, truncated


@dataclass
class SequenceBatch:
    """(prompt, response) sequences packed by prompt into right-padded rows.

    Row b holds one prompt, then each response to it in turn, then padding. A response attends to
    its prompt and causally to itself, not to the other responses (``attention_mask``), and its
    positions continue from the prompt's end (``position_ids``): it is computed exactly as if it
    followed its prompt alone, while the prompt is computed once for all of them. Sequence n, in
    the order given to ``collate``, has its prompt in columns ``[0, prompt_lens[n])`` of row
    ``rows[n]`` and its response in columns ``[starts[n], starts[n] + lengths[n] - prompt_lens[n])``.
    """

    tokens: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    # [B, 1, S, S], True = masked out (Megatron's convention); None when no row holds two
    # responses: causal attention alone is then exact, and runs on SDPA's faster unmasked path.
    attention_mask: torch.Tensor | None
    rows: torch.Tensor  # [N]
    starts: torch.Tensor  # [N]
    prompt_lens: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N], prompt + response: the sequence's length on its own
    num_tokens: int  # real (non-padding) tokens in the rows: a shared prompt counts once

    def to(self, device) -> "SequenceBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def group_by_prompt(sequences: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Indices of the sequences that share a prompt (equal token ids), one list per distinct
    prompt in order of first appearance, each in the order given."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (prompt, _) in enumerate(sequences):
        groups.setdefault(tuple(prompt), []).append(index)
    return list(groups.values())


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Pack ``(prompt_ids, response_ids)`` pairs into one row per distinct prompt, padded on the
    right with ``pad_id`` (see SequenceBatch)."""
    if not sequences:
        raise ValueError("collate got no sequences")
    if any(not prompt for prompt, _ in sequences):
        raise ValueError("collate got an empty prompt; every sequence needs at least one prompt token")
    groups = group_by_prompt(sequences)
    packed = []  # per row: (tokens, positions, segments), segment 0 the prompt and k the k-th response
    rows, starts = [0] * len(sequences), [0] * len(sequences)
    for row, group in enumerate(groups):
        prompt = sequences[group[0]][0]
        tokens, positions, segments = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for k, index in enumerate(group, start=1):
            response = sequences[index][1]
            rows[index], starts[index] = row, len(tokens)
            tokens += response
            positions += range(len(prompt), len(prompt) + len(response))
            segments += [k] * len(response)
        packed.append((tokens, positions, segments))
    width = max(len(tokens) for tokens, _, _ in packed)
    tokens = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    # Padding is a segment of its own: it sees the prompt and itself, so no query row is all masked.
    segment = torch.full((len(groups), width), len(sequences) + 1, dtype=torch.long)
    for row, (row_tokens, row_positions, row_segments) in enumerate(packed):
        tokens[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        position_ids[row, : len(row_tokens)] = torch.tensor(row_positions, dtype=torch.long)
        segment[row, : len(row_tokens)] = torch.tensor(row_segments, dtype=torch.long)
    attention_mask = None
    if len(groups) < len(sequences):
        key, query = segment[:, None, :], segment[:, :, None]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attention_mask = ~(causal & ((key == 0) | (key == query)))[:, None]
    prompt_lens = [len(prompt) for prompt, _ in sequences]
    return SequenceBatch(
        tokens=tokens,
        position_ids=position_ids,
        attention_mask=attention_mask,
        rows=torch.tensor(rows, dtype=torch.long),
        starts=torch.tensor(starts, dtype=torch.long),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.long),
        lengths=torch.tensor([p + len(response) for p, (_, response) in zip(prompt_lens, sequences)], dtype=torch.long),
        num_tokens=sum(len(row_tokens) for row_tokens, _, _ in packed),
    )
