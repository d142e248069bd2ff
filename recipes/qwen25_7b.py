"""qwen25_7b: the paper's Qwen2.5 setting (FuseAI/FuseChat-Qwen-2.5-7B-SFT; sampling 0.8 / 0.95)."""
from metaapo_nemo.config import (
    AlgoConfig, DataConfig, MetaAPOConfig, PolicyConfig, RewardConfig, RolloutConfig, TrainerConfig,
)


def recipe() -> MetaAPOConfig:
    return MetaAPOConfig(
        output_dir="results/qwen25_7b",
        policy=PolicyConfig(lr=5e-7, max_prompt_length=2048, max_length=4096, bf16=True),
        data=DataConfig(max_eval_prompts=805),
        reward=RewardConfig(timeout_s=300.0),
        algo=AlgoConfig(name="metaapo", iterations=3, num_samples=8, beta=0.1, meta_interval=8),
        rollout=RolloutConfig(engine="trtllm", temperature=0.8, top_p=0.95, max_new_tokens=2048),
        trainer=TrainerConfig(global_batch_size=128, micro_batch_size=1),
    )
