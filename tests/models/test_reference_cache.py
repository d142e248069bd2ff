"""The reference's log-probs of the offline pairs, cached on disk: the cached values are the reference
forward's exactly, a second look-up reads them without a forward, the key follows the reference's
weights, the data and the precision (not the folder's name), a damaged entry is recomputed with a
warning, and on two ranks every rank gets the same values with rank 0 alone writing."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.hf_convert import save_hf_checkpoint
from metaapo_nemo.models.policy import MegatronPolicy
from metaapo_nemo.models.reference_cache import checkpoint_fingerprint, offline_reference_logps
from tests.helpers import run_ranks

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=64, max_position_embeddings=64)


def _pairs(n: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, CFG.vocab_size) for _ in range(rng.randint(1, k))]  # noqa: E731
    return [([1, *ids(8)], [*ids(10), 2], [*ids(10), 2]) for _ in range(n)]


def _reference(folder: Path, seed: int = 0) -> MegatronPolicy:
    """A frozen reference with its weights written as the Hugging Face checkpoint `folder`."""
    torch.manual_seed(seed)
    reference = MegatronPolicy(CFG, None, pad_id=0)
    save_hf_checkpoint(folder, CFG, reference.hf_state_dict())
    return reference


def _counting(reference: MegatronPolicy) -> list:
    """Record every reference.score call's sequence count."""
    calls, score = [], reference.score

    def counted(sequences, *args, **kwargs):
        calls.append(len(sequences))
        return score(sequences, *args, **kwargs)
    reference.score = counted
    return calls


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "sft"
    return _reference(folder), folder


def test_cached_log_probs_are_the_reference_forward_exactly_and_a_second_look_up_reads_them_without_one(reference, tmp_path):
    policy, folder = reference
    pairs = _pairs(40, seed=1)
    direct_logps, direct_ntoks = policy.score([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs])
    calls = _counting(policy)
    first = offline_reference_logps(policy, folder, pairs, tmp_path, "fp32")
    second = offline_reference_logps(policy, folder, pairs, tmp_path, "fp32")
    assert calls == [80]  # one forward over every pair, at the first look-up only
    assert (first.read, first.written, second.read, first.path) == (False, True, True, second.path)
    for got in (first, second):
        assert torch.equal(got.chosen, direct_logps[:40]) and torch.equal(got.rejected, direct_logps[40:])
        assert torch.equal(got.chosen_tokens, direct_ntoks[:40]) and torch.equal(got.rejected_tokens, direct_ntoks[40:])
    # A slice's rows are what reference.score gives for it (chosen..., rejected...), as metaapo.py uses them.
    idx = [3, 17, 39]
    logps, ntoks = second.rows(idx)
    assert torch.equal(logps, torch.cat([direct_logps[idx], direct_logps[[40 + i for i in idx]]]))
    assert torch.equal(ntoks, torch.cat([direct_ntoks[idx], direct_ntoks[[40 + i for i in idx]]]))
    assert logps.dtype == direct_logps.dtype and ntoks.dtype == direct_ntoks.dtype


def test_the_json_beside_an_entry_says_what_its_key_is_made_of(reference, tmp_path):
    policy, folder = reference
    got = offline_reference_logps(policy, folder, _pairs(8, seed=2), tmp_path, "fp32")
    about = json.loads(got.path.with_suffix(".json").read_text())
    assert about["key"] == got.path.stem
    assert about["key_parts"]["reference"] == checkpoint_fingerprint(folder)
    assert {k: about["key_parts"][k] for k in ("format", "pairs", "precision")} == {"format": 1, "pairs": 8, "precision": "fp32"}
    assert about["about"]["reference"] == str(folder) and about["about"]["pairs"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([got.path.name, got.path.with_suffix(".json").name])


def test_another_data_set_precision_or_reference_gets_its_own_entry_and_the_same_weights_elsewhere_share_one(
        reference, tmp_path):
    policy, folder = reference
    pairs = _pairs(12, seed=3)
    base = offline_reference_logps(policy, folder, pairs, tmp_path, "fp32").path
    one_token_off = [pairs[0], (pairs[1][0], pairs[1][1][:-2] + [7, 2], pairs[1][2]), *pairs[2:]]
    swapped = [(p, r, c) for p, c, r in pairs]
    other = _reference(tmp_path / "other_sft", seed=1)
    copy = tmp_path / "copied_sft"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    paths = [offline_reference_logps(policy, folder, one_token_off, tmp_path, "fp32").path,
             offline_reference_logps(policy, folder, swapped, tmp_path, "fp32").path,
             offline_reference_logps(policy, folder, pairs[:11], tmp_path, "fp32").path,
             offline_reference_logps(policy, folder, pairs, tmp_path, "bf16").path,
             offline_reference_logps(other, tmp_path / "other_sft", pairs, tmp_path, "fp32").path]
    assert len({base, *paths}) == 6 and all(p.is_file() for p in paths)
    calls = _counting(policy)
    shared = offline_reference_logps(policy, copy, pairs, tmp_path, "fp32")
    assert shared.path == base and shared.read and calls == []  # the same bytes under another folder name


@pytest.mark.parametrize("damage", ["cut short", "a flipped bit", "another entry's file", "not safetensors"])
def test_a_damaged_entry_is_recomputed_and_overwritten_with_a_warning(reference, tmp_path, damage):
    policy, folder = reference
    pairs = _pairs(16, seed=4)
    good = offline_reference_logps(policy, folder, pairs, tmp_path, "fp32")
    data = good.path.read_bytes()
    if damage == "cut short":
        data = data[: len(data) - 20]
    elif damage == "a flipped bit":
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]  # inside the last tensor's bytes
    elif damage == "another entry's file":
        data = offline_reference_logps(policy, folder, pairs[:15], tmp_path, "fp32").path.read_bytes()
    else:
        data = b"\0" * 64
    good.path.write_bytes(data)
    lines, calls = [], _counting(policy)
    again = offline_reference_logps(policy, folder, pairs, tmp_path, "fp32", log=lines.append)
    assert calls == [32] and not again.read and again.written
    assert len(lines) == 1 and lines[0].startswith(f"[yellow]warning: the reference log-prob cache {again.path} is damaged")
    assert "\n" not in lines[0] and again.warning in lines[0]
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        assert torch.equal(getattr(again, name), getattr(good, name)), name
    assert again.path.read_bytes() == good.path.read_bytes() != data  # overwritten, sound again
    assert offline_reference_logps(policy, folder, pairs, tmp_path, "fp32").read


def test_without_a_checkpoint_folder_there_is_no_cache(reference, tmp_path):
    policy, folder = reference
    calls = _counting(policy)
    for checkpoint in (None, tmp_path / "missing", folder / "config.json"):
        assert offline_reference_logps(policy, checkpoint, _pairs(4, seed=5), tmp_path / "cache", "fp32") is None
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    assert checkpoint_fingerprint(tmp_path / "no_weights") is None
    assert calls == [] and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_folder_leaves_the_values_computed_with_a_warning(reference, tmp_path):
    policy, folder = reference
    (tmp_path / "a_file").write_text("")
    lines = []
    got = offline_reference_logps(policy, folder, _pairs(4, seed=6), tmp_path / "a_file" / "cache", "fp32",
                                  log=lines.append)
    assert not got.read and not got.written and got.chosen.shape == (4,)
    assert len(lines) == 1 and "could not write the reference log-prob cache" in lines[0]


def test_on_two_ranks_every_rank_gets_the_same_values_and_rank_zero_alone_writes(tmp_path):
    run_ranks(2, str(Path(__file__)), str(tmp_path), timeout=300)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [o["read"] for o in outs] == [[False, True, False]] * 2  # computed, read, recomputed (damaged)
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        values = [o[name] for o in outs]  # per rank: [computed, read, recomputed]
        assert all(torch.equal(v, values[0][0]) for per_rank in values for v in per_rank), name
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".safetensors"]


# ------------------------------------------------------------------------------------------
# The two-rank worker (DP=2): every rank runs what follows.


def _worker(directory: Path) -> None:
    from metaapo_nemo.distributed import barrier, world_rank

    torch.set_num_threads(1)
    init_distributed()
    folder = directory / "sft"
    torch.manual_seed(0)
    reference = MegatronPolicy(CFG, None, pad_id=0)
    if world_rank() == 0:
        save_hf_checkpoint(folder, CFG, reference.hf_state_dict())
    barrier()
    pairs, cache = _pairs(20, seed=7), directory / "cache"
    got = [offline_reference_logps(reference, folder, pairs, cache, "fp32"),
           offline_reference_logps(reference, folder, pairs, cache, "fp32")]
    barrier()
    if world_rank() == 0:
        got[0].path.write_bytes(got[0].path.read_bytes()[:100])
    barrier()
    got.append(offline_reference_logps(reference, folder, pairs, cache, "fp32"))
    out = {"read": [g.read for g in got]}
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        out[name] = [getattr(g, name) for g in got]
    torch.save(out, directory / f"rank{world_rank()}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _worker(Path(sys.argv[1]))
