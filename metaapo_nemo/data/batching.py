"""Tokenizing prompts and responses, truncating them, and padding them into a batch.

A sequence is ``prompt_ids + response_ids``; the sequence log-prob log pi(y|x) counts the response
tokens only. The sequences of a batch that share a prompt (a pair's chosen and rejected, an item's
offline and online responses) share one row: the prompt once, then each response, kept apart by an
attention mask (ECOSYSTEM.md, speed levers: the prompt computed once) or, where that is less work,
all in one unpadded row attended by segments (Segments). Rows are right-padded, and a batch whose
rows each hold one response needs no mask at all: causal attention keeps every real token from
seeing the padding that follows it.
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
class Segments:
    """Attention by segments, for a batch whose sequences share prompts: each prompt attends
    causally to itself, each response to its prompt and causally to itself, and nothing else is
    computed (a dense mask over the row would compute every masked-out query-key product too:
    4x the needed work for a prompt with four responses of its length). Flat token index
    ``i = s * B + b`` is column s of row b in megatron's sequence-first layout.

    ``prompt_index`` [G, P]: the flat index of each group's prompt tokens, padded at the end with
    its last one (causal attention keeps every real query from the padding after it);
    ``key_index`` [N, P + L]: per response, its prompt's tokens (``prompt_index`` of its group)
    then its own, padded likewise; ``response_mask`` [N, 1, L, P + L], True = attend: the
    prompt's real keys, then the response's keys causally; ``out_index`` [B * S]: where each flat
    token's attention output is in the concatenation of the prompt outputs [G * P] and the
    response outputs [N * L] (padding tokens read an arbitrary one; nothing reads them back).
    """

    prompt_index: torch.Tensor
    key_index: torch.Tensor
    response_mask: torch.Tensor
    out_index: torch.Tensor

    @property
    def response_index(self) -> torch.Tensor:
        """[N, L]: the flat index of each response's tokens (the last L columns of key_index)."""
        return self.key_index[:, self.prompt_index.size(1):]

    def to(self, device) -> "Segments":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _segments_cost(groups: list[list[int]], sequences, attention_width: float | None) -> float:
    """_layout_cost's measure for attention by segments: one row of the real tokens, no padding;
    the causal prompt attention over [G, P] and each response's [L] queries over its P + L keys
    (P, L: the longest prompt and response), in token-equivalents of attention_width keys."""
    tokens = sum(len(sequences[g[0]][0]) + sum(len(sequences[i][1]) for i in g) for g in groups)
    if not attention_width:
        return float(tokens)
    p_max = max(len(sequences[g[0]][0]) for g in groups)
    l_max = max(len(response) for _, response in sequences)
    keys = len(groups) * p_max * p_max / 2 + len(sequences) * l_max * (p_max + l_max)
    return tokens + keys / attention_width


def _segments(groups: list[list[int]], sequences, n_rows: int, width: int, rows: list[int], starts: list[int],
              prompt_starts: list[int]) -> Segments:
    """The Segments of a collated batch of n_rows rows of `width` columns."""
    prompt_len = [len(sequences[g[0]][0]) for g in groups]
    response_len = [len(response) for _, response in sequences]
    p_max, l_max = max(prompt_len), max(1, max(response_len))
    group_of = [0] * len(sequences)
    prompt_index, key_index = [], []
    out_index = [0] * (n_rows * width)  # padding reads output 0
    for g, members in enumerate(groups):
        first = members[0]
        cols = [c * n_rows + rows[first] for c in range(prompt_starts[first], prompt_starts[first] + prompt_len[g])]
        for p, flat in enumerate(cols):
            out_index[flat] = g * p_max + p
        prompt_index.append(cols + cols[-1:] * (p_max - len(cols)))
        for n in members:
            group_of[n] = g
    base = len(groups) * p_max
    for n in range(len(sequences)):
        cols = [c * n_rows + rows[n] for c in range(starts[n], starts[n] + response_len[n])]
        for j, flat in enumerate(cols):
            out_index[flat] = base + n * l_max + j
        prompt = prompt_index[group_of[n]]
        key_index.append(prompt + cols + (cols or prompt)[-1:] * (l_max - len(cols)))
    keys = torch.arange(p_max + l_max)
    lens = torch.tensor([prompt_len[g] for g in group_of])
    prompt_part = (keys[:p_max] < lens[:, None])[:, None, :].expand(-1, l_max, -1)  # [N, L, P]
    response_part = (keys[:l_max] <= torch.arange(l_max)[:, None]).expand(len(sequences), -1, -1)  # [N, L, L]
    return Segments(prompt_index=torch.tensor(prompt_index), key_index=torch.tensor(key_index),
                    response_mask=torch.cat([prompt_part, response_part], dim=2)[:, None],
                    out_index=torch.tensor(out_index))


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
    # Attention by segments instead of attention_mask (then None): see Segments.
    segments: Segments | None = None

    def to(self, device) -> "SequenceBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, Segments))})


def pad_columns(batch: SequenceBatch, multiple: int) -> SequenceBatch:
    """The batch with its rows right-padded to a multiple of `multiple` columns (values the same).

    For kernels that pay per new shape: on the CPU, oneDNN builds each bf16 matrix product for
    its exact shape on first use (~1.5 ms each, against ~0.1 ms to run one of the tiny_cpu
    model's), and every batch of a run has a new width. The new columns hold token 0 at
    position 0; a new column's query attends to itself only, and no real query to it; segments'
    out_index sends its output nowhere that is read. Rows and sequence offsets are unchanged.
    """
    rows, width = batch.tokens.shape
    extra = -width % multiple
    if extra == 0:
        return batch
    wider = width + extra
    mask = batch.attention_mask
    if mask is not None:
        padded = torch.ones(rows, 1, wider, wider, dtype=torch.bool)
        padded[:, :, :width, :width] = mask
        new = torch.arange(width, wider)
        padded[:, :, new, new] = False
        mask = padded
    segments = batch.segments
    if segments is not None:  # flat index s * rows + b: the new columns come last
        segments = replace(segments, out_index=torch.nn.functional.pad(segments.out_index, (0, extra * rows)))
    return replace(batch, tokens=torch.nn.functional.pad(batch.tokens, (0, extra)),
                   position_ids=torch.nn.functional.pad(batch.position_ids, (0, extra)), attention_mask=mask,
                   segments=segments)


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
            attention_width: float | None = None, segments: bool | None = None) -> SequenceBatch:
    """Pack ``(prompt_ids, response_ids)`` pairs into rows padded on the right with ``pad_id``
    (see SequenceBatch).

    The sequences that share a prompt form one group. With every group a single sequence, each
    row holds one: no mask is needed. Otherwise (a mask is needed anyway) the groups are packed
    first-fit decreasing into rows of up to ``row_capacity`` times the longest group's tokens;
    with ``row_capacity=None`` (the default) into the layout of ROW_CAPACITIES with the least
    matrix-product work: padded cells, each weighted by 1 + width / ``attention_width`` (pass the
    model's ModelConfig.attention_width; None counts the cells alone). Measured in
    benchmarks/packed_rows.py. ``row_capacity=0``: one prompt per row, in the order given.

    ``segments=True``: no mask; every group goes into ONE row, in the order given, with no
    padding at all, and attention is computed by segments (Segments: only the query-key products
    a mask would keep). The default (``None``), with shared prompts and no ``row_capacity``: by
    segments when that costs no more work, by _segments_cost, than the best masked layout.
    """
    if not sequences:
        raise ValueError("collate got no sequences")
    if any(not prompt for prompt, _ in sequences):
        raise ValueError("collate got an empty prompt; every sequence needs at least one prompt token")
    groups = group_by_prompt(sequences)
    sizes = [len(sequences[g[0]][0]) + sum(len(sequences[i][1]) for i in g) for g in groups]
    shared = len(groups) < len(sequences)
    by_segments = shared and bool(segments)
    if shared and row_capacity is None:
        layouts = [_fill_rows(sizes, int(c * max(sizes))) for c in ROW_CAPACITIES]
        layout = min(layouts, key=lambda rows: _layout_cost(sizes, rows, attention_width))
        if segments is None:
            by_segments = _segments_cost(groups, sequences, attention_width) <= _layout_cost(sizes, layout, attention_width)
    elif shared and row_capacity > 0:
        layout = _fill_rows(sizes, max(max(sizes), int(row_capacity * max(sizes))))
    else:
        layout = [[g] for g in range(len(groups))]
    if by_segments:
        layout = [list(range(len(groups)))]
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
    if shared and not by_segments:
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
        segments=_segments(groups, sequences, len(layout), width, rows, starts, prompt_starts) if by_segments else None,
    )
