"""The Bradley-Terry reward model: the policy's megatron-core GPTModel without its LM head, and a
scalar head (Linear hidden -> 1, no bias) read at the last token of prompt + response, as the
MetaAPO paper trains it from the SFT model (METAAPO.md, reward model).

It is saved as the Hugging Face ``...ForSequenceClassification`` (num_labels=1) checkpoint that
``reward.models.HFRewardModel`` (``metaapo serve-reward --model DIR``) serves: the backbone's
weights under their causal-LM names less ``lm_head``, the head as ``score.weight``. That model
pools the last token that is not its pad id; ``token_ids`` drops trailing pad ids so the token read
here is that one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.hf_convert import export_hf_state_dict, load_hf_into_model, save_hf_checkpoint
from metaapo_nemo.models.logprobs import decoder_hidden_states


def token_ids(tokenizer, text: str) -> list[int]:
    """The ids the served model scores for ``text`` (prompt followed by response): the tokenizer's
    own encoding with its special tokens, as HFRewardModel encodes it, less trailing pad ids."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    while ids and tokenizer.pad_token_id is not None and ids[-1] == tokenizer.pad_token_id:
        ids.pop()
    return ids


class MegatronRewardModel(torch.nn.Module):
    """GPTModel backbone (this process holds all of it: tensor and pipeline parallel size 1) and the
    scalar head. ``hf_state_dict``: the causal-LM weights it starts from (the SFT model)."""

    def __init__(self, cfg: ModelConfig, hf_state_dict: dict[str, Tensor], pad_id: int):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        self.backbone = build_gpt_model(cfg)
        load_hf_into_model(self.backbone, cfg, hf_state_dict)
        weight = self.backbone.embedding.word_embeddings.weight
        # A zero head scores every text 0: training starts from no preference at all.
        self.head = torch.nn.Linear(cfg.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
        torch.nn.init.zeros_(self.head.weight)

    def forward(self, sequences: list[list[int]]) -> Tensor:
        """Reward [N] (fp32) of each token sequence: the head on the final-norm hidden state of its
        last token. Rows are right-padded; causal attention keeps the padding out of real tokens."""
        device = self.head.weight.device
        lengths = torch.tensor([len(ids) for ids in sequences], device=device)
        tokens = torch.full((len(sequences), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(sequences):
            tokens[row, : len(ids)] = torch.tensor(ids)
        hidden = decoder_hidden_states(self.backbone, tokens.to(device))  # [S, N, H]
        last = hidden[lengths - 1, torch.arange(len(sequences), device=device)]  # [N, H]
        return self.head(last).squeeze(-1).float()

    @torch.no_grad()
    def score(self, sequences: list[list[int]], batch_size: int = 32) -> list[float]:
        """Rewards of many sequences, in order, without gradients."""
        return [r for start in range(0, len(sequences), batch_size)
                for r in self(sequences[start : start + batch_size]).tolist()]

    def save_hf(self, path, tokenizer) -> None:
        """Write the Hugging Face reward-model folder (config.json, model.safetensors, tokenizer)."""
        weights = export_hf_state_dict(self.backbone, self.cfg)
        weights.pop("lm_head.weight", None)
        weights["score.weight"] = self.head.weight.detach()
        family = "Qwen2" if self.cfg.qkv_bias else "Llama"
        save_hf_checkpoint(path, self.cfg, weights, tokenizer, config_extra=dict(
            architectures=[f"{family}ForSequenceClassification"], num_labels=1,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """-log sigmoid(r(x, y_w) - r(x, y_l)), the mean over pairs (Bradley-Terry negative log-likelihood)."""
    return -torch.nn.functional.logsigmoid(reward_chosen - reward_rejected).mean()

