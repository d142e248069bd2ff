"""A user's own run instead of the embedded task: a Hugging Face Llama folder as policy and
reference, preference data in Parquet and held-out prompts in JSON Lines, an external reward server
started with `metaapo serve-reward` (with a token), and the Online DPO baseline by algo.name."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metaapo_nemo.data import toy_task
from tests.reward.fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    tokenizer = toy_task.build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    prompts = toy_task.make_prompts(24, seed=5)
    pairs = toy_task.offline_pairs(prompts, seed=6)
    pq.write_table(pa.Table.from_pylist([{"prompt_id": f"p{i}", **p} for i, p in enumerate(pairs)]), root / "train.parquet")
    with open(root / "eval.jsonl", "w") as f:
        for p in toy_task.make_prompts(8, seed=7, exclude=set(prompts)):
            f.write(json.dumps({"prompt": p}) + "\n")
    return root


def test_online_dpo_on_a_user_checkpoint_data_and_external_reward_server(user_files, tmp_path):
    server = ServerProcess(tmp_path / "server.log", "--reward-fn", "metaapo_nemo.data.toy_task:reward",
                           env={"METAAPO_REWARD_TOKEN": "s3cret"}).wait_healthy()
    try:
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", "task.enabled=false",
               f"policy.hf_path={user_files / 'sft'}", f"reference.hf_path={user_files / 'sft'}",
               f"data.train={user_files / 'train.parquet'}", f"data.eval={user_files / 'eval.jsonl'}",
               f"reward.url={server.url}", "reward.token=s3cret", "reward.reward_fn=None", "algo.name=online_dpo",
               "algo.iterations=2", "algo.num_samples=4", "rollout.max_new_tokens=8", "trainer.global_batch_size=8",
               "trainer.micro_batch_size=8", "rollout.eval_samples=1", f"output_dir={out}", "seed=3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        server.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "online_dpo" and summary["finished"]
    assert summary["annotation_ratio"] == 1.0 and summary["prompts_considered"] == 24
    assert summary["meta_updates"] == 0
    assert summary["num_online_pairs"] + summary["ties"] == 24
    assert not (out / "reward_server.log").exists()  # the external server did the scoring
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "train_step"]
    assert steps and all(r["loss_offline"] == 0 for r in steps)  # online pairs only
    assert (out / "final" / "config.json").exists()
