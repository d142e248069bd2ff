"""llama31_8b: the paper's Llama-3.1 setting (METAAPO.md, Table B.4).

Policy: a DPO warm-up of allenai/Llama-3.1-Tulu-3-8B-SFT; reference: the SFT model. Point
policy.hf_path / reference.hf_path at local copies, data.train at UltraFeedback-binarized
(prompt/chosen/rejected) and reward.url at a Bradley-Terry reward server.
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
        trainer=TrainerConfig(global_batch_size=128, micro_batch_size=1),
    )
