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


# The row capacities collate tries, in multiples of the longest prompt group's tokens, when the
# batch needs a mask anyway (several sequences share a prompt); see collate.
ROW_CAPACITIES = (1.0, 1.3, 1.6, 2.0, 2.5, 3.0)


@dataclass
class SequenceBatch:
    """(prompt, response) sequences packed by prompt into right-padded rows.

    A row holds one or more prompt groups, each a prompt followed by every response to it. A
    response attends to its own prompt and causally to itself, not to the other responses or the
    other groups of its row (``attention_mask``), and its positions continue from its prompt's end
    while every prompt starts again at 0 (``position_ids``): it is computed exactly as if it
    followed its prompt alone, while the prompt is computed once for all of them. Sequence n, in
    the order given to ``collate``, has its prompt in columns
    ``[prompt_starts[n], prompt_starts[n] + prompt_lens[n])`` of row ``rows[n]`` and its response in
    columns ``[starts[n], starts[n] + lengths[n] - prompt_lens[n])``.
    """

    tokens: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    # [B, 1, S, S], True = masked out (Megatron's convention); None when every row holds one
    # sequence: causal attention alone is then exact, and runs on SDPA's faster unmasked path.
    attention_mask: torch.Tensor | None
    rows: torch.Tensor  # [N]
    starts: torch.Tensor  # [N]
    prompt_lens: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N], prompt + response: the sequence's length on its own
    num_tokens: int  # real (non-padding) tokens in the rows: a shared prompt counts once
    prompt_starts: torch.Tensor  # [N]

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


def _fill_rows(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the groups (by index) of each row, no row over `capacity` tokens."""
    rows: list[list[int]] = []
    used: list[int] = []
    for group in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        row = next((r for r, u in enumerate(used) if u + sizes[group] <= capacity), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(group)
        used[row] += sizes[group]
    return rows


def _layout_cost(sizes: list[int], layout: list[list[int]], attention_width: float | None) -> float:
    """Matrix-product work of a layout, in token-equivalents: every cell of the padded
    [rows, width] batch pays its projections and MLP, and its attention over `width` keys adds
    width / attention_width of that (ModelConfig.attention_width)."""
    width = max(sum(sizes[g] for g in row) for row in layout)
    return len(layout) * width * (1.0 + (width / attention_width if attention_width else 0.0))


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, row_capacity: float | None = None,
            attention_width: float | None = None) -> SequenceBatch:
    """Pack ``(prompt_ids, response_ids)`` pairs into rows padded on the right with ``pad_id``
    (see SequenceBatch).

    The sequences that share a prompt form one group. With every group a single sequence, each
    row holds one: no mask is needed. Otherwise (a mask is needed anyway) the groups are packed
    first-fit decreasing into rows of up to ``row_capacity`` times the longest group's tokens;
    with ``row_capacity=None`` (the default) into the layout of ROW_CAPACITIES with the least
    matrix-product work: padded cells, each weighted by 1 + width / ``attention_width`` (pass the
    model's ModelConfig.attention_width; None counts the cells alone). Measured in
    benchmarks/packed_rows.py. ``row_capacity=0``: one prompt per row, in the order given.
    """
    if not sequences:
        raise ValueError("collate got no sequences")
    if any(not prompt for prompt, _ in sequences):
        raise ValueError("collate got an empty prompt; every sequence needs at least one prompt token")
    groups = group_by_prompt(sequences)
    sizes = [len(sequences[g[0]][0]) + sum(len(sequences[i][1]) for i in g) for g in groups]
    shared = len(groups) < len(sequences)
    if shared and row_capacity is None:
        layouts = [_fill_rows(sizes, int(c * max(sizes))) for c in ROW_CAPACITIES]
        layout = min(layouts, key=lambda rows: _layout_cost(sizes, rows, attention_width))
    elif shared and row_capacity > 0:
        layout = _fill_rows(sizes, max(max(sizes), int(row_capacity * max(sizes))))
    else:
        layout = [[g] for g in range(len(groups))]
    # Per token, a segment id: group g's prompt is g * span, its k-th response g * span + k; padding
    # is its own segment. A token sees a key of its own segment or of its group's prompt, causally.
    span = max(len(g) for g in groups) + 1
    pad_segment = len(groups) * span
    packed = []  # per row: (tokens, positions, segments)
    rows, starts, prompt_starts = [0] * len(sequences), [0] * len(sequences), [0] * len(sequences)
    for row, row_groups in enumerate(layout):
        tokens, positions, segments = [], [], []
        for g in row_groups:
            prompt, first = sequences[groups[g][0]][0], len(tokens)
            tokens += prompt
            positions += range(len(prompt))
            segments += [g * span] * len(prompt)
            for k, index in enumerate(groups[g], start=1):
                response = sequences[index][1]
                rows[index], starts[index], prompt_starts[index] = row, len(tokens), first
                tokens += response
                positions += range(len(prompt), len(prompt) + len(response))
                segments += [g * span + k] * len(response)
        packed.append((tokens, positions, segments))
    width = max(len(tokens) for tokens, _, _ in packed)
    tokens = torch.full((len(packed), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(packed), width), dtype=torch.long)
    segment = torch.full((len(packed), width), pad_segment, dtype=torch.long)
    for row, (row_tokens, row_positions, row_segments) in enumerate(packed):
        tokens[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
        position_ids[row, : len(row_tokens)] = torch.tensor(row_positions, dtype=torch.long)
        segment[row, : len(row_tokens)] = torch.tensor(row_segments, dtype=torch.long)
    attention_mask = None
    if shared:
        key, query = segment[:, None, :], segment[:, :, None]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attention_mask = ~(causal & ((key == query) | (key == query // span * span)))[:, None]
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
        prompt_starts=torch.tensor(prompt_starts, dtype=torch.long),
    )
