import pytest
import torch

from metaapo_nemo.data.batching import collate, encode_prompt, encode_response, truncate
from metaapo_nemo.data.toy_task import build_tokenizer

# Toy tokenizer ids: <pad> 0, <bos> 1, <eos> 2, 'a'..'z' 4..29, ':' 41, '=' 42, '.' 43.
A, B, E, H, I, R, S, U, V = 4, 5, 8, 11, 12, 21, 22, 24, 25
COLON, EQUALS, DOT = 41, 42, 43


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}.{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    return tokenizer


def test_plain_prompt_is_bos_then_its_characters(tokenizer):
    assert encode_prompt(tokenizer, "rev:ab=") == [1, R, E, V, COLON, A, B, EQUALS]


def test_plain_prompt_without_a_bos_token_is_just_its_text(tokenizer):
    tokenizer.bos_token = None
    assert encode_prompt(tokenizer, "ab") == [A, B]


def test_chat_template_renders_a_string_as_one_user_turn_with_the_generation_prompt(chat_tokenizer):
    # "<bos>u:hi.a:" -- the template's own bos, not a second one.
    assert encode_prompt(chat_tokenizer, "hi") == [1, U, COLON, H, I, DOT, A, COLON]


def test_chat_template_renders_message_lists(chat_tokenizer):
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]
    # "<bos>s:be.u:hi.a:"
    assert encode_prompt(chat_tokenizer, messages) == [1, S, COLON, B, E, DOT, U, COLON, H, I, DOT, A, COLON]


def test_messages_without_a_chat_template_are_an_error(tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])


def test_response_is_its_text_then_eos(tokenizer):
    assert encode_response(tokenizer, "ba") == [B, A, 2]
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        encode_response(tokenizer, "ba")


def test_collate_right_pads_one_row_per_prompt_with_no_mask():
    batch = collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10, 11]), ([12, 13], [])], pad_id=0)
    assert torch.equal(
        batch.tokens,
        torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11], [12, 13, 0, 0, 0, 0]]),
    )
    assert batch.tokens.dtype == torch.long
    assert batch.attention_mask is None  # one response per row: causal attention is exact
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5], [0, 1, 0, 0, 0, 0]]  # padding: 0
    assert batch.rows.tolist() == [0, 1, 2] and batch.starts.tolist() == [3, 1, 2]
    assert batch.prompt_lens.tolist() == [3, 1, 2]
    assert batch.lengths.tolist() == [5, 6, 2]
    assert batch.num_tokens == 13


def test_collate_packs_the_responses_that_share_a_prompt_behind_one_copy_of_it():
    # Sequences 0, 2 and 3 share prompt [1, 2]; prompt [5]'s group (2 tokens) fits in the same row
    # (capacity 1.6 x the longest group's 8 tokens), after the longer group.
    batch = collate([([1, 2], [3, 4]), ([5], [6]), ([1, 2], [7]), ([1, 2], [8, 9, 10])], pad_id=0, row_capacity=1.6)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 7, 8, 9, 10, 5, 6]]
    # A response's positions continue from its prompt's end, as if it followed the prompt alone;
    # every prompt starts at 0.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4, 0, 1]]
    assert batch.rows.tolist() == [0, 0, 0, 0] and batch.starts.tolist() == [2, 9, 4, 5]
    assert batch.prompt_starts.tolist() == [0, 8, 0, 0]
    assert batch.prompt_lens.tolist() == [2, 1, 2, 2] and batch.lengths.tolist() == [4, 2, 3, 5]
    assert batch.num_tokens == 10
    # Each response attends to its own prompt and causally to itself, nothing of the other group
    # (True = masked out).
    sees = (~batch.attention_mask[0, 0]).int().tolist()
    assert sees == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_collate_fills_rows_first_fit_decreasing_up_to_the_capacity():
    # Groups of 10, 7 and 3 tokens, capacity int(1.6 x 10) = 16: the 10 and the 3 share row 0, the
    # 7 does not fit beside them and takes row 1, padded to 13.
    sequences = [([1, 2], [3, 4, 5, 6]), ([5], [6, 6, 6, 6, 6, 6]), ([11, 12], [13]), ([1, 2], [7, 8, 9, 10])]
    batch = collate(sequences, pad_id=0, row_capacity=1.6)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
                                     [5, 6, 6, 6, 6, 6, 6, 0, 0, 0, 0, 0, 0]]
    assert batch.rows.tolist() == [0, 1, 0, 0] and batch.starts.tolist() == [2, 1, 12, 6]
    assert batch.prompt_starts.tolist() == [0, 0, 10, 0]
    assert batch.num_tokens == 20
    # Row 1's padding sees only the padding up to itself, so no query row is all masked, and no
    # real token sees padding.
    sees = ~batch.attention_mask[1, 0]
    assert sees[9].int().tolist() == [0] * 7 + [1, 1, 1] + [0] * 3
    assert not sees[:7, 7:].any()


def test_collate_picks_the_row_layout_with_the_least_matrix_product_work():
    # Groups of 6, 3, 3 and 3 tokens. By capacity (x 6): 1.0 and 1.3 give rows [6 | 3+3 | 3],
    # 3 x 6 = 18 cells; 1.6 (9) [6+3 | 3+3], 2 x 9 = 18; 2.0 (12) [6+3+3 | 3], 2 x 12 = 24;
    # 2.5 (15) and 3.0 (18) one row of 15 = 15 cells.
    sequences = [([1, 2], [3, 4]), ([1, 2], [5, 6]), ([7], [8]), ([7], [9]), ([10], [11]), ([10], [12]),
                 ([13], [14]), ([13], [15])]
    cells_only = collate(sequences, pad_id=0, segments=False)
    assert cells_only.tokens.shape == (1, 15)
    assert cells_only.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    # Attention as costly per key as the rest at width 10: each cell costs 1 + width / 10, so
    # 18 x 1.6 = 28.8 (three rows of 6, the first such layout: capacity 1.0) beats 18 x 1.9 =
    # 34.2 and 15 x 2.5 = 37.5.
    weighed = collate(sequences, pad_id=0, attention_width=10.0, segments=False)
    assert weighed.tokens.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 0, 0, 0]]
    assert weighed.rows.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    # An explicit capacity is kept.
    assert collate(sequences, pad_id=0, row_capacity=1.6).tokens.shape == (2, 9)


def test_model_attention_width_counts_the_flops_of_a_layer():
    from metaapo_nemo.models.config import ModelConfig

    # tiny_cpu: hidden 128, 4 heads of 32, 2 KV groups, SwiGLU 352. Weights per layer:
    # q, k, v 128 x 256 + output 128 x 128 + MLP 3 x 128 x 352 = 32768 + 16384 + 135168 = 184320;
    # attention per key and token: 2 x 4 x 32 = 256 multiply-adds. 184320 / 256 = 720.
    assert ModelConfig(64, 128, 4, 4, 2, 352).attention_width == 720.0


def test_collate_keeps_one_sequence_per_row_when_no_prompt_is_shared():
    batch = collate([([1, 2], [3]), ([4], [5]), ([6], [7, 8])], pad_id=0)
    assert batch.attention_mask is None and batch.tokens.size(0) == 3
    assert batch.rows.tolist() == [0, 1, 2] and batch.prompt_starts.tolist() == [0, 0, 0]


def test_collate_lays_shared_prompts_out_by_segments():
    # Group 0: prompt [1, 2] with responses [3] and [4, 5]; group 1: prompt [6] with [7]. One row,
    # no padding; the longest prompt P = 2, the longest response L = 2.
    batch = collate([([1, 2], [3]), ([1, 2], [4, 5]), ([6], [7])], pad_id=0, segments=True)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7]] and batch.attention_mask is None
    assert batch.rows.tolist() == [0, 0, 0] and batch.starts.tolist() == [2, 3, 6]
    assert batch.prompt_starts.tolist() == [0, 0, 5] and batch.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1]]
    seg = batch.segments
    assert seg.prompt_index.tolist() == [[0, 1], [5, 5]]  # group 1's prompt padded with its last token
    # Per response: its prompt's tokens, then its own, padded with its last.
    assert seg.key_index.tolist() == [[0, 1, 2, 2], [0, 1, 3, 4], [5, 5, 6, 6]]
    assert seg.response_index.tolist() == [[2, 2], [3, 4], [6, 6]]
    t, f = True, False
    assert seg.response_mask[:, 0].tolist() == [
        [[t, t, t, f], [t, t, t, t]],
        [[t, t, t, f], [t, t, t, t]],
        [[t, f, t, f], [t, f, t, t]],  # group 1's prompt has one real token
    ]
    # Outputs: prompts [G * P] = 4 slots, then responses [N * L] from slot 4.
    assert seg.out_index.tolist() == [0, 1, 4, 6, 7, 2, 8]


def test_collate_attends_by_segments_when_that_is_less_work():
    from metaapo_nemo.data.batching import _segments_cost, group_by_prompt

    # Equal prompts of 4 with two responses of 4: by segments 8 x 12 = 96 tokens and
    # 8 x 4 x 4 / 2 + 16 x 4 x 8 = 576 query-key products; masked rows of 12 at best: at width 10
    # 96 + 57.6 against 96 cells x (1 + 12 / 10).
    even = [([g, g, g, g], [g + 1] * 4) for g in range(10, 90, 10) for _ in range(2)]
    assert _segments_cost(group_by_prompt(even), even, 10.0) == 96 + 57.6
    assert collate(even, pad_id=0, attention_width=10.0).segments is not None
    # One prompt of 16 among seven of 1, one-token responses: segments pay P = 16 for every
    # group (8 x 16 x 16 / 2 + 16 x 1 x 17 = 1296 products, 39 + 129.6) against two masked rows
    # of 21 (18 + 3 | 7 x 3), 42 x (1 + 21 / 10) = 130.2.
    uneven = [(list(range(1, 17)), [50]), (list(range(1, 17)), [51])]
    uneven += [([g], [r]) for g in range(60, 67) for r in (3, 4)]
    assert _segments_cost(group_by_prompt(uneven), uneven, 10.0) == pytest.approx(39 + 129.6)
    chosen = collate(uneven, pad_id=0, attention_width=10.0)
    assert chosen.segments is None and chosen.tokens.shape == (2, 21)
    # Without an attention width, cells alone: one row of the real tokens always wins.
    assert collate(uneven, pad_id=0).segments is not None
    # Asked for explicitly, either way.
    assert collate(uneven, pad_id=0, attention_width=10.0, segments=True).segments is not None
    assert collate(even, pad_id=0, segments=False).segments is None


def test_collate_rejects_empty_input():
    with pytest.raises(ValueError, match="no sequences"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        collate([([], [1])], pad_id=0)


def test_truncate_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    prompt, response = list(range(10)), [100, 101, 102, 103]
    assert truncate(prompt, response, max_prompt_len=4, max_len=6) == ([6, 7, 8, 9], [100, 101], True)
    assert truncate(prompt, response, max_prompt_len=4, max_len=20) == ([6, 7, 8, 9], response, True)
    assert truncate([1, 2], response, max_prompt_len=4, max_len=5) == ([1, 2], [100, 101, 102], True)


def test_truncate_leaves_fitting_sequences_alone():
    assert truncate([1, 2], [3, 4], max_prompt_len=2, max_len=4) == ([1, 2], [3, 4], False)


def test_truncate_needs_room_for_a_response():
    with pytest.raises(ValueError, match="0 < max_prompt_len < max_len"):
        truncate([1], [2], max_prompt_len=8, max_len=8)
