"""`metaapo train-reward`: the Bradley-Terry loss and the scalar read at the last token against a hand
computation, training that learns a separable preference, and the saved folder scoring the same in
transformers and behind `serve-reward --model DIR` as the Megatron model that was trained."""
import json
import random

import httpx
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2Config, Qwen2ForCausalLM,
)

from metaapo_nemo import cli
from metaapo_nemo.data import toy_task
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.hf_convert import load_hf_checkpoint
from metaapo_nemo.models.reward_model import MegatronRewardModel, bradley_terry_loss, token_ids
from metaapo_nemo.reward.local import start_local_reward_server
from metaapo_nemo.reward.train import SUMMARY_FILE, train_reward_model

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LETTERS = "abcdefgh"


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A random tiny Llama causal LM with the toy task's character tokenizer: the 'SFT model'."""
    folder = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    tokenizer = toy_task.build_tokenizer()
    LlamaForCausalLM(LlamaConfig(**SIZES, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pairs(n: int, seed: int) -> list[dict]:
    """The chosen response is the rejected one with one letter, anywhere, replaced by 'z'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rejected = "".join(rng.choice(LETTERS) for _ in range(6))
        at = rng.randrange(len(rejected))
        prompt = "".join(rng.choice(LETTERS) for _ in range(4)) + "="
        rows.append({"prompt_id": f"{seed}-{i}", "prompt": prompt, "chosen": rejected[:at] + "z" + rejected[at + 1:],
                     "rejected": rejected})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_loss_is_bradley_terry_and_the_reward_is_the_head_on_the_last_token(sft_dir):
    loss = bradley_terry_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]))
    # pair 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617; pair 2: -log sigmoid(-1) = log(1 + e) = 1.3132617
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)

    cfg, weights = load_hf_checkpoint(sft_dir)
    model = MegatronRewardModel(cfg, weights, pad_id=0)
    head = torch.randn(1, SIZES["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.head.weight.copy_(head)
    backbone = LlamaModel.from_pretrained(sft_dir, dtype=torch.float32).eval()
    # Two pairs of different lengths, so the batch is padded and the last real token differs per row.
    texts = [("abc=", "dzef", "def"), ("h=", "zzzzzzz", "ab")]
    tokenizer = toy_task.build_tokenizer()
    sequences = [token_ids(tokenizer, prompt + answer) for prompt, *answers in texts for answer in answers]
    rewards = model(sequences[0::2] + sequences[1::2])  # chosen of both pairs, then rejected
    with torch.no_grad():
        hand = [float(backbone(torch.tensor([ids])).last_hidden_state[0, -1] @ head[0]) for ids in sequences]
    assert rewards.tolist() == pytest.approx(hand[0::2] + hand[1::2], abs=1e-5)
    expected = (-torch.nn.functional.logsigmoid(torch.tensor([hand[0] - hand[1], hand[2] - hand[3]]))).mean()
    assert bradley_terry_loss(rewards[:2], rewards[2:]).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.fixture(scope="module")
def trained(sft_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_reward")
    train = _write(folder / "train.jsonl", _pairs(160, seed=1))
    held_out = _write(folder / "eval.jsonl", _pairs(64, seed=2))
    lines = []
    summary = train_reward_model(str(sft_dir), str(train), str(folder / "rm"), eval_path=str(held_out), epochs=3,
                                 lr=3e-3, batch_size=16, max_length=32, seed=0, log=lines.append)
    return folder / "rm", summary, lines


def test_training_on_a_separable_preference_lifts_held_out_accuracy_from_chance_to_above_0_9(trained):
    out, summary, lines = trained
    accuracies = [epoch["accuracy"] for epoch in summary["epochs"]]
    assert accuracies[0] == 0.5  # the zero head: every margin 0, ties count half
    assert accuracies[-1] >= 0.9, lines
    assert summary["epochs"][-1]["mean_margin"] > 0
    assert json.loads((out / SUMMARY_FILE).read_text())["epochs"] == summary["epochs"]
    assert any("epoch 3: held-out accuracy" in line for line in lines)


def test_the_saved_folder_scores_like_the_trained_model_in_transformers_and_behind_the_server(trained, sft_dir):
    out, summary, _ = trained
    rows = _pairs(4, seed=3)
    prompts = [row["prompt"] for row in rows for _ in range(2)]
    responses = [row[key] for row in rows for key in ("chosen", "rejected")]
    tokenizer = toy_task.build_tokenizer()
    sequences = [token_ids(tokenizer, p + r) for p, r in zip(prompts, responses)]

    # The Megatron model as it was saved: the backbone from the folder's weights, the head from score.weight.
    hf_model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    cfg, _ = load_hf_checkpoint(sft_dir)
    backbone = {k: v for k, v in hf_model.state_dict().items() if k != "score.weight"}
    megatron = MegatronRewardModel(cfg, {**backbone, "lm_head.weight": torch.zeros(SIZES["vocab_size"], 32)}, 0)
    with torch.no_grad():
        megatron.head.weight.copy_(hf_model.score.weight)
    expected = megatron.score(sequences)
    assert max(abs(r) for r in expected) > 0.1  # a trained head: the comparison can fail

    with torch.no_grad():
        alone = [hf_model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]
    assert alone == pytest.approx(expected, abs=1e-4)
    # ... and those weights are the trained ones: the held-out mean margin the trained model printed.
    assert _mean_margin(hf_model, out.parent / "eval.jsonl") == pytest.approx(summary["epochs"][-1]["mean_margin"], abs=1e-4)
    with start_local_reward_server(model_dir=str(out), batch_size=3) as server:
        answer = httpx.post(f"{server.url}/get_reward", json={"query": [p + r for p, r in zip(prompts, responses)],
                                                             "prompts": prompts}, timeout=30, trust_env=False)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(expected, abs=1e-4)


def _mean_margin(hf_model, pairs_file) -> float:
    """The mean of r(chosen) - r(rejected) over a pairs file, each text scored alone by transformers."""
    tokenizer = toy_task.build_tokenizer()
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    with torch.no_grad():
        rewards = {text: hf_model(input_ids=torch.tensor([token_ids(tokenizer, text)])).logits[0, 0].item()
                   for row in rows for text in (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])}
    return sum(rewards[row["prompt"] + row["chosen"]] - rewards[row["prompt"] + row["rejected"]] for row in rows) / len(rows)


def test_a_qwen2_sft_model_becomes_a_qwen2_reward_model_scoring_as_trained(tmp_path):
    """Qwen2: a qkv bias and tied embeddings, which the reward model's folder must carry over."""
    tokenizer = toy_task.build_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True, pad_token_id=0)).save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    train, held_out = _write(tmp_path / "train.jsonl", _pairs(64, seed=1)), _write(tmp_path / "eval.jsonl", _pairs(16, seed=2))
    summary = train_reward_model(str(tmp_path / "sft"), str(train), str(tmp_path / "rm"), eval_path=str(held_out),
                                 lr=3e-3, batch_size=16, max_length=32, log=lambda line: None)
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "Qwen2ForSequenceClassification"
    assert abs(summary["epochs"][-1]["mean_margin"]) > 1e-3
    assert _mean_margin(hf_model, held_out) == pytest.approx(summary["epochs"][-1]["mean_margin"], abs=1e-4)


def test_a_missing_init_folder_is_one_line_and_exit_status_2(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", _pairs(4, seed=0))
    status = cli.main(["train-reward", "--init", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "rm")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: --init") and err.count("\n") == 1, err
