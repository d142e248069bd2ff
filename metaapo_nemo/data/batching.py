"""Tokenizing prompts and responses, truncating them, and padding them into a batch.

A sequence is ``prompt_ids + response_ids``; the sequence log-prob log pi(y|x) counts the response
tokens only, so a batch keeps where each prompt ends (``prompt_lens``) and where each sequence
ends (``lengths``). Batches are right-padded, which lets attention run causal without a mask.
"""

from dataclasses import dataclass

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
    """Right-padded prompt+response sequences.

    ``tokens[i, :lengths[i]]`` is sequence i; its response starts at ``prompt_lens[i]``.
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    lengths: torch.Tensor


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    """Pad ``(prompt_ids, response_ids)`` pairs on the right with ``pad_id`` into one batch."""
    if not sequences:
        raise ValueError("collate got no sequences")
    if any(not prompt for prompt, _ in sequences):
        raise ValueError("collate got an empty prompt; every sequence needs at least one prompt token")
    lengths = [len(prompt) + len(response) for prompt, response in sequences]
    tokens = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        tokens[row, : lengths[row]] = torch.tensor(prompt + response, dtype=torch.long)
    return SequenceBatch(
        tokens=tokens,
        prompt_lens=torch.tensor([len(prompt) for prompt, _ in sequences], dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
    )
