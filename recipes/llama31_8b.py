"""llama31_8b: the paper's Llama-3.1 setting (METAAPO.md, Table B.4).

Policy: a DPO warm-up of allenai/Llama-3.1-Tulu-3-8B-SFT; reference: the SFT model. Point
policy.hf_path / reference.hf_path at local copies, data.train at UltraFeedback-binarized
(prompt/chosen/rejected) and reward.url at a Bradley-Terry reward server.

Layout on 8x80 GB nodes: TP=8, PP=1, one model replica per node, data parallel over nodes. Memory
per GPU for Llama-3.1-8B (8.03B parameters) with Megatron mixed precision and Adam:
  policy   bf16 weights 2 + fp32 main grads 4 + fp32 master weights 4 + Adam m, v 8 = 18 B/param
           = 144.5 GB, / TP 8 = 18.1 GB
  reference (frozen, bf16)             16.1 GB / 8 = 2.0 GB
  rollout engine weights (bf16, TP kept, PP dropped)  16.1 GB / 8 = 2.0 GB
  activations, micro-batch 1 = 4 sequences (offline and online chosen/rejected) x 4096 tokens,
           about 34 x tokens x hidden bytes per layer x 32 layers / TP 8 = 9.1 GB
  together about 31 GB, leaving about 49 GB for CUDA context, NCCL buffers and the engine's KV
  cache (8 KV heads x 128 x 32 layers x 2 x 2 B = 128 KiB per token, 16 KiB per GPU at TP 8: K=8
  samples x 4096 tokens of about 80 prompts in 40 GB). TP=4 would hold 36 GB of policy state and
  18 GB of activations per GPU, 62 GB in all, and squeeze the KV cache to ~15 GB; PP would add bubbles
  and a stage gather at every refit for no memory the TP=8 layout lacks. The 8 KV heads divide
  by TP=8, and TP stays inside a node's NVLink domain.
"""
from metaapo_nemo.config import (
    AlgoConfig, DataConfig, MetaAPOConfig, PolicyConfig, RewardConfig, RolloutConfig, TrainerConfig,
)


def recipe() -> MetaAPOConfig:
    return MetaAPOConfig(
        output_dir="results/llama31_8b",
        policy=PolicyConfig(lr=5e-7, max_prompt_length=2048, max_length=4096, bf16=True),
        data=DataConfig(max_eval_prompts=805),
        reward=RewardConfig(timeout_s=300.0),
        algo=AlgoConfig(name="metaapo", iterations=3, num_samples=8, beta=0.1, meta_interval=8),
        rollout=RolloutConfig(engine="trtllm", temperature=1.0, top_p=1.0, max_new_tokens=2048),
        trainer=TrainerConfig(tensor_model_parallel_size=8, pipeline_model_parallel_size=1,
                              global_batch_size=128, micro_batch_size=1),
    )
