"""The meta-learner h_phi, its buffer and its update (MetaAPO paper Section 4.3, Eq. 6, Eq. 7).

h_phi maps the offline preference score l_off to the weight w in (0, 1) that decides online
sampling (u > w) and weights the offline pair against the online one in the policy loss (Eq. 5).
Its own loss (Eq. 6) is the same weighted sum, but with the policy's per-pair losses frozen:

    L_meta(phi) = mean_B [ h_phi(l_off) L_off + (1 - h_phi(l_off)) L_on ]
    grad_phi    = mean_B [ (L_off - L_on) grad_phi h_phi(l_off) ]                    (Eq. 7)

so h falls where the online pair has the lower loss and rises where the offline pair does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

HIDDEN_SIZE = 100


class MetaLearner(nn.Module):
    """h_phi: 1 -> 100 -> 1 MLP (Linear, Tanh, Linear, Sigmoid), weights 0.1 and biases 0 at init
    as in the reference code, so the untrained h(s) = sigmoid(10 tanh(0.1 s))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, HIDDEN_SIZE), nn.Tanh(), nn.Linear(HIDDEN_SIZE, 1), nn.Sigmoid()
        )
        for layer in (self.net[0], self.net[2]):
            nn.init.constant_(layer.weight, 0.1)
            nn.init.zeros_(layer.bias)

    def forward(self, scores: Tensor) -> Tensor:
        """Meta weights w = h_phi(l_off) [N] in (0, 1) for offline scores [N], on scores' device."""
        if scores.dim() != 1:
            raise ValueError(f"MetaLearner takes offline scores of shape [N], got {tuple(scores.shape)}")
        param = self.net[0].weight
        w = self.net(scores.to(device=param.device, dtype=param.dtype).unsqueeze(-1)).squeeze(-1)
        return w.to(scores.device)

    @torch.no_grad()
    def weights(self, scores: Tensor) -> Tensor:
        """Detached meta weights for the policy loss and for sampling: Eq. 5 gives phi no gradient."""
        return self(scores.detach())


def make_meta_optimizer(meta: MetaLearner, lr: float = 5e-3, weight_decay: float = 1e-4) -> torch.optim.AdamW:
    """AdamW over phi with the paper's meta lr 5e-3 and weight decay 1e-4 (Appendix B.1)."""
    return torch.optim.AdamW(meta.parameters(), lr=lr, weight_decay=weight_decay)


def meta_loss(meta: MetaLearner, score_off: Tensor, loss_off: Tensor, loss_on: Tensor) -> Tensor:
    """Eq. 6: mean [h_phi(l_off) L_off + (1 - h_phi(l_off)) L_on], differentiable in phi only."""
    h = meta(score_off.detach())
    loss_off = loss_off.detach().to(device=h.device, dtype=h.dtype)
    loss_on = loss_on.detach().to(device=h.device, dtype=h.dtype)
    return (h * loss_off + (1.0 - h) * loss_on).mean()


class MetaBuffer:
    """The meta buffer B: detached per-pair (l_off, L_off, L_on) of the pairs that had an online
    pair, over the policy optimiser steps since the last meta update (T_meta of them)."""

    def __init__(self) -> None:
        self._score_off: list[Tensor] = []
        self._loss_off: list[Tensor] = []
        self._loss_on: list[Tensor] = []
        self.num_steps = 0

    def add(self, score_off: Tensor, loss_off: Tensor, loss_on: Tensor) -> None:
        """Add one optimiser step's pairs (tensors [n]); they are stored detached, on CPU."""
        shapes = {tuple(t.shape) for t in (score_off, loss_off, loss_on)}
        if len(shapes) != 1 or score_off.dim() != 1:
            raise ValueError(
                f"MetaBuffer.add needs three tensors of one shape [n], got shapes "
                f"{tuple(score_off.shape)}, {tuple(loss_off.shape)}, {tuple(loss_on.shape)}"
            )
        stores = (self._score_off, self._loss_off, self._loss_on)
        for store, value in zip(stores, (score_off, loss_off, loss_on)):
            store.append(value.detach().to(device="cpu", dtype=torch.float32))
        self.num_steps += 1

    def __len__(self) -> int:
        return sum(t.numel() for t in self._score_off)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(score_off, loss_off, loss_on), each all buffered pairs concatenated [len(self)]."""
        empty = torch.empty(0, dtype=torch.float32)
        stores = (self._score_off, self._loss_off, self._loss_on)
        return tuple(torch.cat(store) if store else empty for store in stores)

    def clear(self) -> None:
        self._score_off.clear()
        self._loss_off.clear()
        self._loss_on.clear()
        self.num_steps = 0

    def state_dict(self) -> dict:
        score_off, loss_off, loss_on = self.tensors()
        return {"score_off": score_off, "loss_off": loss_off, "loss_on": loss_on, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        if state["score_off"].numel():
            self.add(state["score_off"], state["loss_off"], state["loss_on"])
        self.num_steps = int(state["num_steps"])


def meta_update(meta: MetaLearner, optimizer: torch.optim.Optimizer, buffer: MetaBuffer) -> dict:
    """One AdamW step on Eq. 6 over the whole buffer, then clear the buffer.

    Returns meta_loss (before the step), meta_buffer_pairs and meta_weight_mean (mean h_phi over
    the buffer's scores after the step: the weights the policy sees next).
    """
    if len(buffer) == 0:
        raise ValueError(
            "meta_update got an empty meta buffer: add the steps' (score_off, loss_off, loss_on) "
            "with MetaBuffer.add first, or skip the update when no pair had an online pair"
        )
    score_off, loss_off, loss_on = buffer.tensors()
    optimizer.zero_grad(set_to_none=True)
    loss = meta_loss(meta, score_off, loss_off, loss_on)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats = {
        "meta_loss": loss.item(),
        "meta_buffer_pairs": len(buffer),
        "meta_weight_mean": meta.weights(score_off).mean().item(),
    }
    buffer.clear()
    return stats
