"""Small things several test files share."""
import torch


def spread_weights(model: torch.nn.Module, seed: int, scale: float = 0.15, norm_scale: float = 0.1) -> torch.nn.Module:
    """HF's 0.02-std init gives near-uniform logits; wider weights make parity tests bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + norm_scale * noise if "norm" in name else scale * noise)
    return model.eval()
