"""qwen25_7b: the paper's Qwen2.5 setting (FuseAI/FuseChat-Qwen-2.5-7B-SFT): the Llama recipe's
hyper-parameters with the Qwen sampling temperature 0.8 and top-p 0.95 (METAAPO.md).

Layout on 8x80 GB nodes: TP=4, PP=2, one model replica per node, data parallel over nodes. TP must
divide Qwen2.5-7B's 28 attention heads and 4 KV heads, so TP=8 (the Llama layout) is impossible and
TP=4 is the largest. Memory per GPU (7.62B parameters, 18 B/param of policy state as in llama31_8b):
  policy state 137.2 GB / (TP 4 x PP 2) = 17.1 GB; reference bf16 15.2 GB / 8 = 1.9 GB;
  rollout engine bf16, TP 4 with every layer (PP is dropped for inference) 15.2 GB / 4 = 3.8 GB;
  activations (4 x 4096 tokens, hidden 3584, 28 layers, 34 bytes per token per hidden unit per
  layer) / TP 4 = 14.0 GB, held by the first stage for 2 micro-batches in flight over half the
  layers, so about the same;
  together about 37 GB, leaving about 40 GB for the KV cache (56 KiB per token, 14 KiB per GPU).
  TP=4 with PP=1 would need 34 GB of policy state and 14 GB of activations per GPU, about 56 GB,
  leaving ~20 GB of KV cache; PP=2 halves the state and keeps the model-parallel group on one node.
"""
from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.recipes.llama31_8b import recipe as llama31_8b


def recipe() -> MetaAPOConfig:
    config = llama31_8b()
    config.output_dir = "results/qwen25_7b"
    config.rollout.temperature, config.rollout.top_p = 0.8, 0.95
    config.trainer.tensor_model_parallel_size, config.trainer.pipeline_model_parallel_size = 4, 2
    return config
