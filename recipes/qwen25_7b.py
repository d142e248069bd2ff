"""qwen25_7b: the paper's Qwen2.5 setting: the Llama recipe's hyper-parameters with the Qwen sampling
temperature 0.8 and top-p 0.95 (METAAPO.md).

Policy: a DPO warm-up of FuseAI/FuseChat-Qwen-2.5-7B-SFT (policy.hf_path); reference: the SFT model
itself (reference.hf_path; unset, the reference is the policy's start and the run warns). Data,
reward and the CUDA requirement as in llama31_8b.

Layout on 8x80 GB nodes: TP=4, PP=2, one model replica per node, data parallel over nodes. TP must
divide Qwen2.5-7B's 28 attention heads and 4 KV heads, so TP=8 (the Llama layout) is impossible and
TP=4 is the largest; PP=2 halves the per-GPU state and keeps the model-parallel group on one node.

Memory per GPU (launch/plan.py, the formulas of llama31_8b; GB = 1e9 B). P = 7.62B parameters (28
layers of 233.1M, embedding and LM head 545.0M each, untied); a stage holds 14 layers plus the
embedding (first) or the LM head (last), 3.81B, N = 3.81B / TP 4 = 0.952B per GPU.
  policy      6 B x N = 5.71 (bf16 weights, fp32 main grads); 12 B x N / DP = 11.42 on one node,
              5.71 on two (distributed optimizer)
  reference   2 B x N = 1.90
  rollout engine weights: the whole model on every rank, as in llama31_8b, 2 B x P = 15.23
  activations, T = 16384 tokens per micro-batch as in llama31_8b; per token and layer
              A = 2 x (4 x 3584 + (2 x 3584 + 2 x 512 + 4 x 18944) / 4) = 70656 B.
              Without recompute the first stage holds 2 micro-batches in flight (1F1B):
              14 x T x A x 2 = 32.41, total 66.7 GB, leaving 13.3 GB.
              With full recompute, uniform, 1 layer per unit (this recipe) the last stage needs most:
              14 x T x 2 B x 3584 = 1.64 kept + T x A = 1.16 recomputed + logits
              T x 152064 / 4 x 6 B = 3.74, together 6.54.
  total on one node 40.81 GB of 80 (the last stage), leaving 39.2 GB for CUDA context, NCCL buffers
  and the KV cache (2 x 28 x 4 KV heads x 128 x 2 B = 56 KiB per token: about 680k tokens).
  Recompute triples the KV cache's room, as in llama31_8b.
"""
from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.recipes.llama31_8b import recipe as llama31_8b


def recipe() -> MetaAPOConfig:
    config = llama31_8b()
    config.output_dir = "results/qwen25_7b"
    # Yours to set: local copies of a DPO warm-up of FuseAI/FuseChat-Qwen-2.5-7B-SFT (the policy's
    # start) and of FuseAI/FuseChat-Qwen-2.5-7B-SFT itself (the reference; unset: the policy's start, warned).
    config.policy.hf_path, config.reference.hf_path = None, None
    config.rollout.temperature, config.rollout.top_p = 0.8, 0.95
    config.trainer.tensor_model_parallel_size, config.trainer.pipeline_model_parallel_size = 4, 2
    return config
