"""llama31_8b: the paper's Llama-3.1 setting (METAAPO.md, Table B.4).

Policy: a DPO warm-up of allenai/Llama-3.1-Tulu-3-8B-SFT (policy.hf_path); reference: the SFT model
itself (reference.hf_path; unset, the reference is the policy's start and the run warns). Point
both at local copies (the two `hf_path=None` lines below), data.train at UltraFeedback-binarized
(prompt/chosen/rejected), data.eval at held-out prompts and reward.url at a Bradley-Terry reward
server. CUDA GPUs only: on a machine without them
the run stops at set-up in one line (the distributed optimizer and activation recomputation below
exist for CUDA).

Layout on 8x80 GB nodes: TP=8, PP=1, one model replica per node, data parallel over nodes. The 8 KV
heads divide by TP=8 and TP stays inside a node's NVLink domain; PP would add pipeline bubbles and a
stage gather at every refit.

Memory per GPU (launch/plan.py computes it, `--dryrun` prints it; GB = 1e9 B). Llama-3.1-8B has
P = 8.03B parameters (32 layers of 218.1M, embedding and LM head 525.3M each, untied); N = P / TP
= 1.004B per GPU. DP = nodes.
  policy      bf16 weights 2 B + fp32 main grads 4 B = 6 B x N = 6.02
              fp32 main weights 4 B + Adam m, v 8 B = 12 B x N / DP (distributed optimizer)
              = 12.05 on one node, 6.02 on two, 1.51 on eight
  reference   bf16 2 B x N = 2.01
  rollout engine weights: one engine per rank holding the whole model (each rank samples its own
              share of the prompts), bf16 2 B x P = 16.06
  activations, one micro-batch = 1 prompt x 4 sequences (offline and online chosen / rejected) x
              max_length 4096 = T = 16384 tokens. A layer keeps per token
              A = 2 B x (4h + (2 q_width + 2 kv_width + 4 ffn) / TP)
                = 2 x (4 x 4096 + (2 x 4096 + 2 x 1024 + 4 x 14336) / 8) = 49664 B;
              the logits add T x V / TP x 6 B (bf16 logits, fp32 softmax) = 16384 x 16032 x 6 = 1.58.
              Without recompute: 32 x T x A = 26.04, + 1.58 = 27.61.
              With full recompute, uniform, 1 layer per unit (this recipe): every layer keeps only
              its input, 32 x T x 2 B x 4096 = 4.29, one layer recomputed at a time T x A = 0.81,
              + 1.58 = 6.69.
  total on one node 42.82 GB of 80, leaving 37.2 GB for CUDA context, NCCL buffers and the engine's
  KV cache (2 x 32 layers x 8 KV heads x 128 x 2 B = 128 KiB per token: about 280k tokens, e.g.
  the K=8 samples of 34 prompts at 1024 tokens each). A floor: the TensorRT-LLM engine is shut
  down after sampling, so its weights and KV cache are not live while training's activations
  are. Without recompute the total would be 63.8 GB and the KV cache 16.2 GB: activations would
  be the largest part and would more than halve the rollout batch, for one extra layer forward in
  training (about a third more training FLOPs) saved. The distributed optimizer changes nothing
  on one node (DP=1) and frees 6 GB per GPU from two nodes on; its reduce-scatter plus all-gather
  move the same bytes as the all-reduce it replaces.
"""
from metaapo_nemo.config import (
    AlgoConfig, DataConfig, MetaAPOConfig, PolicyConfig, ReferenceConfig, RewardConfig, RolloutConfig, TrainerConfig,
)


def recipe() -> MetaAPOConfig:
    return MetaAPOConfig(
        output_dir="results/llama31_8b",
        # Yours to set: a local copy of a DPO warm-up of allenai/Llama-3.1-Tulu-3-8B-SFT (Algorithm 1's start),
        policy=PolicyConfig(hf_path=None, lr=5e-7, max_prompt_length=2048, max_length=4096, bf16=True),
        # and of allenai/Llama-3.1-Tulu-3-8B-SFT itself, the paper's reference (unset: the policy's start, warned).
        reference=ReferenceConfig(hf_path=None),
        data=DataConfig(max_eval_prompts=805),
        reward=RewardConfig(timeout_s=300.0, startup_timeout_s=1800.0),  # an 8B reward model loads for minutes
        algo=AlgoConfig(name="metaapo", iterations=3, num_samples=8, beta=0.1, meta_interval=8),
        rollout=RolloutConfig(engine="trtllm", temperature=1.0, top_p=1.0, max_new_tokens=2048),
        trainer=TrainerConfig(accelerator="gpu", tensor_model_parallel_size=8, pipeline_model_parallel_size=1,
                              global_batch_size=128, micro_batch_size=1, use_distributed_optimizer=True,
                              recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    )
