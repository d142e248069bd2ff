"""Reward models the server can hold: a Python function found by import path, or a Bradley-Terry
reward model stored as a Hugging Face folder.

Both are called the same way, ``reward(prompts, responses) -> list[float]``, so the server does not
care which one it serves.
"""

import importlib
from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``MODULE:FUNCTION`` (the function may be a dotted attribute path, ``mod:Class.fn``).

    Raises ValueError with a message saying what to fix when the spec is malformed, the module
    cannot be imported, the attribute is missing or is not callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"--reward-fn must look like MODULE:FUNCTION (e.g. my_rewards.length:score); got {spec!r}"
        )
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} named in --reward-fn {spec!r}: {err}; "
            "is its folder on PYTHONPATH?"
        ) from err
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"--reward-fn {spec!r}: {target!r} has no attribute {attr!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"--reward-fn {spec!r} names {type(target).__name__}, not a function")
    return target


class HFRewardModel:
    """A Bradley-Terry reward model (``AutoModelForSequenceClassification``, ``num_labels=1``) and its
    tokenizer, read from a Hugging Face folder. A text's reward is what the model gives when it is
    called on that text alone; batching and padding do not change it.

    Texts are scored in batches of ``batch_size``, grouped by length so little padding is computed.
    """

    def __init__(self, path: str, batch_size: int = 16, device: str | None = None):
        # torch and transformers are imported here so a server holding a plain function starts fast.
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Checkpoints are often stored in bf16; CPU matmuls in bf16 are slow and less exact.
        dtype = "auto" if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{path} holds a classifier with num_labels={self.model.config.num_labels}; "
                "a Bradley-Terry reward model has num_labels=1"
            )
        # The model pools at the last token that is not its pad id. Left padding with that id keeps
        # the pooled token the one it pools when a text is scored alone. A model without a pad id
        # pools at the last token; an id no token has (-1) makes it do so on a batch too.
        text_config = self.model.config.get_text_config()
        self.padding_id = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        if text_config.pad_token_id is None:
            text_config.pad_token_id = -1
        self.model.to(self.device).eval()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_texts([prompt + response for prompt, response in zip(prompts, responses)])

    def score_texts(self, texts: list[str]) -> list[float]:
        """Reward of each full text (prompt followed by response), in the order given."""
        import torch

        token_ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        if any(len(ids) == 0 for ids in token_ids):
            raise ValueError("a text tokenizes to zero tokens; the reward model cannot score it")
        order = sorted(range(len(texts)), key=lambda i: len(token_ids[i]))
        rewards = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, reward in zip(batch, self._score_batch([token_ids[i] for i in batch])):
                    rewards[i] = reward
        return rewards

    def _score_batch(self, token_ids: list[list[int]]) -> list[float]:
        import torch

        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), self.padding_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(token_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        # Positions count real tokens only, as they do when a text is scored alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
        ).logits
        return logits[:, 0].float().tolist()
