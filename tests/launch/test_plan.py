"""The plan a dry run prints (ranks, layout, memory per GPU by part) against hand computations, and
a GPU recipe started on a machine without GPUs stopping in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaapo_nemo.config import ConfigError
from metaapo_nemo.launch.plan import ARCHITECTURES, describe_plan, estimate_memory_per_gpu, require_gpus
from metaapo_nemo.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")
PATHS = ["policy.hf_path=/x", "data.train=/x", "data.eval=/x", "reward.url=http://127.0.0.1:1"]

# Llama-3.1-8B by hand: 32 layers of q, k, v, o (GQA, 8 KV heads of 128), SwiGLU and two norms; an
# untied embedding and LM head over 128256 tokens; the final norm.
H, KV, F, V, L = 4096, 8 * 128, 14336, 128256, 32
LLAMA_PARAMS = L * (H * (H + 2 * KV) + H * H + 3 * H * F + 2 * H) + 2 * V * H + H
TP, TOKENS = 8, 1 * 4 * 4096  # micro-batch 1 prompt x 4 sequences x max_length
PER_GPU = LLAMA_PARAMS / TP
PER_LAYER_TOKEN = 2 * (4 * H + (2 * H + 2 * KV + 4 * F) / TP)  # bytes a layer keeps per token, bf16
LOGITS = TOKENS * V / TP * 6  # bf16 logits + fp32 softmax
LLAMA_ONE_NODE = {
    "policy_weights": 2 * PER_GPU / 1e9,
    "policy_grads": 4 * PER_GPU / 1e9,
    "optimizer_state": 12 * PER_GPU / 1e9,  # DP = 1: the distributed optimizer shards nothing
    "reference_weights": 2 * PER_GPU / 1e9,
    "rollout_engine_weights": 2 * LLAMA_PARAMS / 1e9,  # one whole-model engine per rank
    # full recompute, 1 layer per unit: each layer's bf16 input, one layer recomputed, the logits
    "activations": (L * TOKENS * 2 * H + TOKENS * PER_LAYER_TOKEN + LOGITS) / 1e9,
}


def _run(args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_llama31_8b_memory_per_gpu_matches_the_hand_computation():
    assert LLAMA_PARAMS == 8_030_261_248
    mem = estimate_memory_per_gpu(get_recipe("llama31_8b"), ARCHITECTURES["llama31_8b"])
    for part, expected in LLAMA_ONE_NODE.items():
        assert mem[part] == pytest.approx(expected, rel=1e-12), part
    total = sum(LLAMA_ONE_NODE.values())
    assert mem["total"] == pytest.approx(total) and mem["left_for_kv_cache"] == pytest.approx(80 - total)
    kv_bytes_per_token = 2 * L * KV * 2  # K and V of every layer in bf16, the whole model per engine
    assert mem["kv_cache_tokens"] == int((80 - total) * 1e9 // kv_bytes_per_token)


def test_metaapo_run_dryrun_prints_the_llama31_8b_plan():
    out = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "llama31_8b", "--dryrun", *PATHS])
    assert out.returncode == 0, out.stderr
    e = LLAMA_ONE_NODE
    total = sum(e.values())
    for line in ("ranks: 1 node(s) x 8 = 8", "parallel: TP=8 x PP=1 x DP=1", "rollout engine: trtllm",
                 "distributed optimizer: on", "activation recompute: full, uniform, 1 layer(s)",
                 "8.03B parameters, 16384 tokens per micro-batch",
                 f"policy weights {e['policy_weights']:.2f} + grads {e['policy_grads']:.2f} + optimizer state "
                 f"{e['optimizer_state']:.2f}",
                 f"reference weights {e['reference_weights']:.2f}, rollout engine weights "
                 f"{e['rollout_engine_weights']:.2f}, activations {e['activations']:.2f}",
                 f"total {total:.2f} of 80; left for the KV cache {80 - total:.2f}"):
        assert line in out.stdout, line


def test_data_parallel_ranks_shard_the_optimizer_state_and_slurm_nodes_set_them():
    import nemo_run as run

    config = get_recipe("llama31_8b")
    two_nodes = estimate_memory_per_gpu(config, ARCHITECTURES["llama31_8b"], ranks=16)
    assert two_nodes["data_parallel"] == 2
    assert two_nodes["optimizer_state"] == pytest.approx(LLAMA_ONE_NODE["optimizer_state"] / 2)
    config.trainer.use_distributed_optimizer = False
    assert estimate_memory_per_gpu(config, ARCHITECTURES["llama31_8b"], ranks=16)["optimizer_state"] == (
        pytest.approx(LLAMA_ONE_NODE["optimizer_state"]))
    text = describe_plan(get_recipe("llama31_8b"), recipe="llama31_8b",
                         executor=run.SlurmExecutor(account="a", nodes=2, ntasks_per_node=8))
    assert "executor: SlurmExecutor" in text and "2 node(s) x 8 = 16" in text and "DP=2" in text
    assert f"optimizer state {LLAMA_ONE_NODE['optimizer_state'] / 2:.2f}" in text


def test_qwen25_7b_pipeline_stages_first_holds_two_micro_batches_last_the_logits():
    h, kv, f, v, layers, tp = 3584, 4 * 128, 18944, 152064, 14, 4  # 14 of 28 layers per stage
    per_layer_token = 2 * (4 * h + (2 * h + 2 * kv + 4 * f) / tp)
    tokens = 4 * 4096
    config = get_recipe("qwen25_7b")
    config.trainer.recompute_granularity = config.trainer.recompute_method = config.trainer.recompute_num_layers = None
    kept = estimate_memory_per_gpu(config, ARCHITECTURES["qwen25_7b"])
    assert kept["stage"] == "the first stage"  # 1F1B: 2 micro-batches in flight on the first of 2 stages
    assert kept["activations"] == pytest.approx(layers * tokens * per_layer_token * 2 / 1e9)
    recomputed = estimate_memory_per_gpu(get_recipe("qwen25_7b"), ARCHITECTURES["qwen25_7b"])
    assert recomputed["stage"] == "the last stage"
    assert recomputed["activations"] == pytest.approx(
        (layers * tokens * 2 * h + tokens * per_layer_token + tokens * v / tp * 6) / 1e9)


def test_the_checkpoint_config_json_sets_the_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True}))
    config = get_recipe("tiny_cpu")
    config.policy.hf_path = str(tmp_path)
    params = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 1000 * 64 + 64  # tied: one matrix
    mem = estimate_memory_per_gpu(config)
    assert mem["policy_weights"] == pytest.approx(4 * params / 1e9)  # tiny_cpu trains in fp32
    assert "memory per GPU (the only stage" in describe_plan(config)
    config.policy.hf_path = str(tmp_path / "missing")
    assert "memory per GPU: not estimated" in describe_plan(config)


def test_accelerator_gpu_is_refused_without_gpus_in_one_line():
    config = get_recipe("llama31_8b")
    with pytest.raises(ConfigError) as info:
        require_gpus(config, cuda_available=False)
    assert str(info.value) == ("this run needs CUDA GPUs (trainer.accelerator=gpu; TP=8 x PP=1 = 8 GPUs per model "
                               "replica) and this machine has none: use --recipe tiny_cpu here")
    require_gpus(config, cuda_available=True)
    require_gpus(get_recipe("tiny_cpu"), cuda_available=False)


@pytest.mark.parametrize("accelerator", ["auto", "cpu"])
def test_the_distributed_optimizer_and_recompute_start_without_gpus_unless_gpus_are_asked_for(accelerator):
    config = get_recipe("llama31_8b")  # distributed optimizer, full recompute, bf16: all run on CPU
    config.trainer.accelerator = accelerator
    require_gpus(config, cuda_available=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_starting_an_8b_recipe_without_gpus_exits_with_one_line():
    out = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "llama31_8b", *PATHS, "rollout.engine=torch"])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: this run needs CUDA GPUs"), out.stderr
    assert "use --recipe tiny_cpu here" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_start_of_an_8b_recipe_without_gpus_says_so_without_a_traceback():
    out = _run([str(NEMO), "llm", "metaapo", "--recipe", "llama31_8b", "--yes", *PATHS, "rollout.engine=torch"])
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "this run needs CUDA GPUs" in text and "Traceback" not in text


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_dryrun_on_slurm_prints_the_plan_for_its_nodes():
    out = _run([str(NEMO), "llm", "metaapo", "--recipe", "llama31_8b", "--dryrun", *PATHS, "run.executor=slurm",
                "run.executor.account=A", "run.executor.partition=P", "run.executor.nodes=2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "executor: SlurmExecutor" in out.stdout and "ranks: 2 node(s) x 8 = 16" in out.stdout
    assert "parallel: TP=8 x PP=1 x DP=2" in out.stdout
    assert f"optimizer state {LLAMA_ONE_NODE['optimizer_state'] / 2:.2f}" in out.stdout
