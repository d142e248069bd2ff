"""Settings of Algorithm 1's loop: ties keep the offline pair, the meta buffer only for a trained
h_phi, the unset-reference warning, algo.random_ratio, trainer.steps_per_iteration and the cached
reference log-probs (reference.logp_cache_dir); the loop checks run the real pipeline on a tiny
Hugging Face Llama of the toy task (one iteration, 24 pairs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from metaapo_nemo.algorithm.metaapo import REFERENCE_UNSET, train_batches
from metaapo_nemo.config import ConfigError
from metaapo_nemo.data import toy_task
from metaapo_nemo.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
PAIRS, BATCH = 24, 8


@pytest.mark.parametrize("override, problem", [
    ({"algo.random_ratio": 0.0}, "algo.random_ratio=0.0: the share of prompts sampled, in (0, 1]"),
    ({"algo.random_ratio": 1.5}, "algo.random_ratio=1.5: the share of prompts sampled, in (0, 1]"),
    ({"trainer.steps_per_iteration": 0}, "trainer.steps_per_iteration=0: a positive integer, or None"),
    ({"trainer.steps_per_iteration": 2.5}, "trainer.steps_per_iteration=2.5: a positive integer, or None"),
    ({"trainer.steps_per_iteration": 4, "trainer.epochs_per_iteration": 2},
     "trainer.steps_per_iteration=4 sets the iteration's length by itself: leave trainer.epochs_per_iteration at 1"),
])
def test_bad_loop_settings_are_refused_in_one_line(override, problem):
    config = get_recipe("tiny_cpu")
    for key, value in override.items():
        section, leaf = key.split(".")
        setattr(getattr(config, section), leaf, value)
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert any(line.strip().startswith(f"- {problem}") for line in str(err.value).splitlines()), str(err.value)


def test_loop_settings_at_their_limits_are_accepted():
    config = get_recipe("tiny_cpu")
    config.algo.random_ratio, config.trainer.steps_per_iteration = 1.0, 3
    config.validate()


def test_epochs_give_each_pass_reshuffled_in_batches_with_a_shorter_last_one():
    batches = train_batches(10, 4, seed=1, iteration=0, epochs=2, steps=None)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_steps_are_full_batches_cut_end_to_end_from_reshuffled_passes():
    passes = train_batches(10, 10, seed=1, iteration=0, epochs=2, steps=None)
    batches = train_batches(10, 4, seed=1, iteration=0, epochs=1, steps=5)
    assert [len(b) for b in batches] == [4] * 5
    assert sum(batches, []) == passes[0] + passes[1]  # the same passes as epochs, from the same seed


def test_steps_over_a_training_set_smaller_than_a_batch_repeat_its_items():
    batches = train_batches(3, 8, seed=1, iteration=2, epochs=1, steps=2)
    assert [len(b) for b in batches] == [8, 8] and set(sum(batches, [])) == {0, 1, 2}


def test_steps_as_many_as_one_epoch_are_that_epoch_and_batches_come_from_the_seed_alone():
    # A resumed run skips IterationState.steps_done batches of this same list.
    assert train_batches(24, 8, 5, 1, 1, 3) == train_batches(24, 8, 5, 1, 1, None) == train_batches(24, 8, 5, 1, 1, 3)
    assert train_batches(24, 8, 5, 1, 1, 3) != train_batches(24, 8, 6, 1, 1, 3)
    assert train_batches(0, 8, 5, 1, 1, 3) == []


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    tokenizer = toy_task.build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    prompts = toy_task.make_prompts(PAIRS, seed=5)
    pairs = toy_task.offline_pairs(prompts, seed=6)
    pq.write_table(pa.Table.from_pylist([{"prompt_id": f"p{i}", **p} for i, p in enumerate(pairs)]), root / "train.parquet")
    with open(root / "eval.jsonl", "w") as f:
        for p in toy_task.make_prompts(4, seed=7, exclude=set(prompts)):
            f.write(json.dumps({"prompt": p}) + "\n")
    return root


def _run(files: Path, out: Path, *extra: str) -> tuple[dict, list[dict], str]:
    """One iteration of the tiny_cpu recipe on the user files; (summary, metrics rows, console output)."""
    cmd = [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", "task.enabled=false",
           f"policy.hf_path={files / 'sft'}", f"data.train={files / 'train.parquet'}", f"data.eval={files / 'eval.jsonl'}",
           "algo.iterations=1", "algo.num_samples=4", "algo.meta_interval=1", "rollout.max_new_tokens=6",
           f"trainer.global_batch_size={BATCH}", f"trainer.micro_batch_size={BATCH}", "rollout.eval_samples=1",
           "trainer.num_threads=1", f"output_dir={out}", "seed=3",
           f"reference.logp_cache_dir={out.parent / 'reference_logps'}", *extra]  # not the user's ~/.cache
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "500"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def all_tied(user_files, tmp_path_factory):
    # top_p this small keeps only the likeliest token: the K samples of a prompt are one text, a tie.
    # reference.hf_path unset: the reference is the policy's start.
    return _run(user_files, tmp_path_factory.mktemp("tied") / "out", "algo.name=metaapo", "rollout.top_p=1e-6")


def test_selected_prompts_whose_samples_all_tie_still_train_their_offline_pair_with_weight_w(all_tied):
    summary, rows, _ = all_tied
    annotated = summary["prompts_annotated"]
    assert 0 < annotated < PAIRS and summary["ties"] == annotated and summary["num_online_pairs"] == 0
    steps = [r for r in rows if r["event"] == "train_step"]
    assert sum(r["pairs"] for r in steps) == annotated and len(steps) == -(-annotated // BATCH)
    assert all(r["loss_online"] == 0 for r in steps)
    # Policy = reference at the first step: l_off = log sigmoid(0), w = h_phi(-0.693) = 0.334 (untrained
    # h_phi, no meta step: the tied pairs never reach the meta buffer), not weight 1.
    assert steps[0]["meta_weight_mean"] == pytest.approx(0.334, abs=0.01)
    assert summary["meta_updates"] == 0


def test_an_unset_reference_is_warned_in_the_log_and_the_summary(all_tied):
    summary, _, output = all_tied
    assert summary["warnings"] == [REFERENCE_UNSET]
    assert f"warning: {REFERENCE_UNSET}" in output


def test_steps_per_iteration_cuts_a_longer_iteration_to_s_steps(user_files, tmp_path):
    # dpo trains all 24 offline pairs: 3 steps of 8 in one epoch.
    summary, rows, _ = _run(user_files, tmp_path / "out", "algo.name=dpo", "trainer.steps_per_iteration=2",
                            f"reference.hf_path={user_files / 'sft'}")
    assert summary["optimizer_steps"] == 2 * summary["iterations"] == 2
    assert [r["pairs"] for r in rows if r["event"] == "train_step"] == [BATCH, BATCH]
    assert summary["warnings"] == []  # the reference was named


def test_steps_per_iteration_lengthens_a_shorter_iteration_and_no_trained_meta_learner_buffers_nothing(user_files, tmp_path):
    # At most 24 prompts to train, at most 3 steps of 8 in one epoch: S = 4 takes more.
    out = tmp_path / "out"
    summary, rows, _ = _run(user_files, out, "algo.name=metaapo_no_meta_learner", "trainer.steps_per_iteration=4")
    assert summary["optimizer_steps"] == 4 and summary["num_online_pairs"] > 0
    assert [r["pairs"] for r in rows if r["event"] == "train_step"] == [BATCH] * 4
    saved = torch.load(out / "checkpoints" / "iter_1" / "run_state.pt", weights_only=True)
    assert [buffer["score_off"].numel() for buffer in saved["meta_buffers"]] == [0]


@pytest.fixture(scope="module")
def cached_runs(user_files, tmp_path_factory):
    """Two runs of the same reference and data on one reference log-prob cache, then one with
    reference.roll_forward=true on a cache folder of its own; (summary, train rows, output, out) each."""
    cache = tmp_path_factory.mktemp("reference_logps")
    runs = []
    for name, extra in (("first", ()), ("second", ()), ("rolled", ("reference.roll_forward=true",))):
        out = tmp_path_factory.mktemp(name) / "out"
        cache_dir = cache if not extra else out.parent / "reference_logps"
        summary, rows, output = _run(user_files, out, "algo.name=metaapo", f"reference.hf_path={user_files / 'sft'}",
                                     f"reference.logp_cache_dir={cache_dir}", *extra)
        rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows
                if r["event"] in ("train_step", "meta_update", "decisions")]
        runs.append((summary, rows, output, out))
    return cache, runs


def _summary_result(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_second", "output_dir", "final_checkpoint")}


def test_a_second_run_reads_the_cached_reference_log_probs_and_trains_to_the_same_result(cached_runs):
    cache, ((first, first_rows, first_log, first_out), (second, second_rows, second_log, second_out), _) = cached_runs
    entry = next(cache.glob("*.safetensors"))
    assert f"reference log-probs of {PAIRS} offline pairs: computed and cached in {entry}" in first_log
    assert f"reference log-probs of {PAIRS} offline pairs: read from {entry}" in second_log  # no reference forward
    assert first["seconds"]["reference"] > 0 and second["seconds"]["reference"] > 0
    assert first_rows and second_rows == first_rows and _summary_result(second) == _summary_result(first)
    a, b = (load_file(out / "final" / "model.safetensors") for out in (first_out, second_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_roll_forward_bypasses_the_cache_and_a_one_iteration_run_scores_exactly_as_from_it(cached_runs):
    _, ((first, first_rows, _, _), _, (rolled, rolled_rows, rolled_log, rolled_out)) = cached_runs
    assert "reference log-probs of" not in rolled_log and not (rolled_out.parent / "reference_logps").exists()
    # One iteration: its slice is the whole data set, so scoring it is the same reference.score call.
    assert rolled_rows == first_rows and _summary_result(rolled) == _summary_result(first)
