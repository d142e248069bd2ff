"""qwen25_7b: the paper's Qwen2.5 setting (FuseAI/FuseChat-Qwen-2.5-7B-SFT): the Llama recipe's
hyper-parameters with the Qwen sampling temperature 0.8 and top-p 0.95 (METAAPO.md)."""
from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.recipes.llama31_8b import recipe as llama31_8b


def recipe() -> MetaAPOConfig:
    config = llama31_8b()
    config.output_dir = "results/qwen25_7b"
    config.rollout.temperature, config.rollout.top_p = 0.8, 0.95
    return config
