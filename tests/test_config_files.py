"""Configs as files: what `nemo llm metaapo --to-yaml` writes loads back with `--yaml` and with
`metaapo run --config`, as does the plain nested YAML `metaapo run --to-yaml` writes; keys absent
from a file keep the recipe's values, overrides after the file win, and a bad file is one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaapo_nemo import config as C
from metaapo_nemo.recipes import RECIPES, get_recipe

ROOT = Path(__file__).resolve().parents[1]
NEMO = Path(sys.executable).with_name("nemo")
needs_nemo = pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "NEMORUN_HOME": str(tmp_path / "nemo_run")}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _metaapo(*args, tmp_path):
    return _run([sys.executable, "-m", "metaapo_nemo", "run", *args], tmp_path)


def _nemo(*args, tmp_path):
    return _run([str(NEMO), "llm", "metaapo", *args], tmp_path)


def _dryrun_config(stdout: str) -> dict:
    """The resolved configuration `metaapo run --dryrun` prints (JSON, before the plan)."""
    import json

    return json.JSONDecoder().raw_decode(stdout)[0]


@pytest.fixture(scope="module")
def nemo_yaml(tmp_path_factory):
    """The file `nemo llm metaapo --recipe tiny_cpu --to-yaml F` writes."""
    tmp = tmp_path_factory.mktemp("nemo_yaml")
    path = tmp / "run.yaml"
    out = _nemo("--recipe", "tiny_cpu", "--to-yaml", str(path), tmp_path=tmp)
    assert out.returncode == 0 and path.exists(), out.stdout[-2000:] + out.stderr[-2000:]
    assert "_partial_: true" in path.read_text()  # the key NeMo-Run's own --yaml refused
    return path


# --- nemo llm metaapo --to-yaml F, then --yaml F -------------------------------------------------

@needs_nemo
def test_nemo_to_yaml_loads_back_with_yaml_and_dries_run_the_same_job(nemo_yaml, tmp_path):
    recipe = _nemo("--recipe", "tiny_cpu", "--dryrun", tmp_path=tmp_path)
    loaded = _nemo("--yaml", str(nemo_yaml), "--yes", "--dryrun", tmp_path=tmp_path)
    assert loaded.returncode == 0, loaded.stdout[-3000:] + loaded.stderr[-3000:]
    assert "Dry run for metaapo" in loaded.stdout and "_partial_" not in loaded.stdout + loaded.stderr
    assert loaded.stdout == recipe.stdout  # the resolved arguments and the plan

    override = _nemo("--yaml", str(nemo_yaml), "--yes", "--dryrun", "algo.beta=0.3", "output_dir=/tmp/never",
                     tmp_path=tmp_path)
    assert override.returncode == 0, override.stdout[-3000:] + override.stderr[-3000:]
    assert "beta=0.3," in override.stdout and "'/tmp/never'" in override.stdout
    assert not Path("/tmp/never").exists()


@needs_nemo
def test_nemo_yaml_of_a_missing_file_is_one_line(tmp_path):
    out = _nemo("--yaml", str(tmp_path / "missing.yaml"), "--yes", "--dryrun", tmp_path=tmp_path)
    assert out.returncode != 0
    assert f"Error: --yaml {tmp_path / 'missing.yaml'}: " in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_round_trips_through_nemo_runs_yaml_with_overrides_winning(name, tmp_path):
    """In process, as `nemo llm metaapo --recipe NAME --to-yaml F` and `--yaml F [overrides]`."""
    from nemo_run.cli.config import ConfigSerializer

    from metaapo_nemo.launch import nemo_cli
    from metaapo_nemo.launch.slurm import config_from_partial

    path = tmp_path / "run.yaml"
    ConfigSerializer().dump(nemo_cli.to_partial(get_recipe(name)), path)
    # --yaml alone starts from the default recipe (tiny_cpu): the file sets every key.
    ctx = nemo_cli.RecipeRunContext(name="metaapo", yaml=str(path))
    assert config_from_partial(ctx.parse_fn(nemo_cli.metaapo, [])) == get_recipe(name)
    assert ctx.yaml == str(path)  # a second parse reads the file again
    wanted = get_recipe(name)
    C.apply_overrides(wanted, ["algo.beta=0.3", "seed=7"])
    assert config_from_partial(ctx.parse_fn(nemo_cli.metaapo, ["algo.beta=0.3", "seed=7"])) == wanted


def test_nemo_yaml_keeps_strings_that_look_like_other_values_and_takes_a_plain_nested_file(tmp_path):
    from metaapo_nemo.launch import nemo_cli
    from metaapo_nemo.launch.slurm import config_from_partial

    path = tmp_path / "plain.yaml"
    path.write_text("output_dir: '123'\nalgo:\n  beta: 0.2\nreward:\n  reward_fn: 'None'\n"
                    "reference:\n  logp_cache_dir: ''\n")
    ctx = nemo_cli.RecipeRunContext(name="metaapo", factory="tiny_cpu", yaml=str(path))
    config = config_from_partial(ctx.parse_fn(nemo_cli.metaapo, []))
    wanted = get_recipe("tiny_cpu")
    wanted.output_dir, wanted.algo.beta, wanted.reward.reward_fn, wanted.reference.logp_cache_dir = "123", 0.2, "None", ""
    assert config == wanted


def test_nemo_yaml_written_for_another_entry_point_is_refused(tmp_path):
    import nemo_run as run

    from metaapo_nemo.launch import nemo_cli

    path = tmp_path / "other.yaml"
    path.write_text("_target_: somewhere.else.train\n_partial_: true\nseed: 1\n")
    ctx = nemo_cli.RecipeRunContext(name="metaapo", yaml=str(path))
    with pytest.raises(run.cli.api.RunContextError, match="written for somewhere.else.train, not for nemo llm metaapo"):
        ctx.parse_fn(nemo_cli.metaapo, [])


# --- metaapo run --config F ----------------------------------------------------------------------

@needs_nemo
def test_metaapo_run_config_takes_the_nemo_yaml(nemo_yaml, tmp_path):
    out = _metaapo("--config", str(nemo_yaml), "--dryrun", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _dryrun_config(out.stdout) == get_recipe("tiny_cpu").to_dict()
    # --recipe chooses the base; a file of every key makes it the file's job all the same
    out = _metaapo("--recipe", "llama31_8b", "--config", str(nemo_yaml), "--dryrun", "algo.beta=0.3", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    wanted = get_recipe("tiny_cpu")
    wanted.algo.beta = 0.3
    assert _dryrun_config(out.stdout) == wanted.to_dict()


def test_metaapo_run_to_yaml_writes_a_plain_file_that_config_reads_back(tmp_path):
    path = tmp_path / "run.yaml"
    out = _metaapo("--recipe", "qwen25_7b", "--to-yaml", str(path), "policy.hf_path=/models/qwen", tmp_path=tmp_path)
    assert out.returncode == 0 and out.stdout == f"wrote {path}\n", out.stderr
    assert out.stderr.startswith("note: invalid configuration")  # data and reward are not set yet
    text = path.read_text()
    assert "_target_" not in text and "\nalgo:\n  name: metaapo\n" in text and "hf_path: /models/qwen" in text
    wanted = get_recipe("qwen25_7b")
    wanted.policy.hf_path = "/models/qwen"
    loaded = get_recipe("tiny_cpu")
    C.load_config_file(loaded, path)
    assert loaded == wanted

    out = _metaapo("--config", str(path), "--dryrun", "data.train=/d/t.jsonl", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    wanted.data.train = "/d/t.jsonl"
    assert _dryrun_config(out.stdout) == wanted.to_dict()


def test_metaapo_run_to_yaml_leaves_the_reward_token_out(tmp_path):
    out = _metaapo("--to-yaml", "-", "reward.token=s3cret", tmp_path=tmp_path)
    assert out.returncode == 0 and "s3cret" not in out.stdout and "token: null" in out.stdout
    assert "reward.token is not written to the file: give it as $METAAPO_REWARD_TOKEN" in out.stderr


def test_a_partial_plain_file_keeps_the_recipes_other_keys_and_an_override_after_it_wins(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("seed: 7\nalgo:\n  beta: 0.2\n  name: online_dpo\nlogger:\n  wandb:\n    project: mine\n"
                    "trainer.log_every: 3\n")
    out = _metaapo("--config", str(path), "--dryrun", "algo.beta=0.4", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    wanted = get_recipe("tiny_cpu")
    wanted.seed, wanted.algo.beta, wanted.algo.name, wanted.trainer.log_every = 7, 0.4, "online_dpo", 3
    wanted.logger.wandb.project = "mine"  # a section nested in a section, as any other
    assert _dryrun_config(out.stdout) == wanted.to_dict()


@pytest.mark.parametrize("text, message", [
    ("algo:\n  bta: 0.1\n", "algo.bta: unknown key 'bta'; valid keys here: name, loss, iterations"),
    ("algoo:\n  beta: 0.1\n", "algoo: no config section 'algoo'"),
    ("sed: 1\n", "sed: unknown key 'sed'; valid keys here: output_dir, seed, policy"),
    ("algo:\n  beta: abc\n", "algo.beta='abc': expected a number"),
    ("algo:\n  keep_ties: 1\n", "algo.keep_ties=1: expected true or false"),
    ("trainer:\n  num_threads: 1.5\n", "trainer.num_threads=1.5: expected an integer or null"),
    ("reward:\n  token: 12345\n", "reward.token=12345: expected a string or null (quote it to make it a string)"),
    ("reward:\n  url: [http://a, 3]\n", "reward.url=['http://a', 3]: expected a string or a list of strings or null"),
    ("algo: 3\n", "algo=3: algo is a config section: give its keys, e.g. `algo: {name: ...}`"),
    ("algo:\n  beta: [0.1\n", "not valid YAML: while parsing a flow sequence"),
    ("- algo\n", "expected a mapping of config keys and sections"),
    ("seed: ${nope}\n", "Interpolation key 'nope' not found"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_key_with_status_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load_config_file(get_recipe("tiny_cpu"), path)
    assert str(info.value) == C.one_line(info.value) and str(info.value).startswith(f"config file {path}: ")
    assert message in str(info.value)


def test_the_cli_says_a_bad_file_in_one_line_with_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  beta: abc\n")
    for path, said in ((bad, "algo.beta='abc': expected a number"), (tmp_path / "missing.yaml", "no such file"),
                       (tmp_path, "cannot read it: Is a directory")):
        out = _metaapo("--config", str(path), "--dryrun", tmp_path=tmp_path)
        assert out.returncode == 2 and out.stderr == f"error: config file {path}: {said}\n", out.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("algo:\n  bta: 0.1\n")
    out = _metaapo("--config", str(unknown), tmp_path=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(f"error: config file {unknown}: algo.bta: unknown key 'bta'")
    assert out.stderr.count("\n") == 1


def test_a_file_is_validated_as_overrides_are(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  num_samples: 1\n")
    out = _metaapo("--config", str(path), tmp_path=tmp_path)  # not --dryrun: the run is refused before it starts
    assert out.returncode == 2 and out.stderr.startswith("error: invalid configuration")
    assert "algo.num_samples must be >= 2" in out.stderr and "Traceback" not in out.stderr


def test_an_empty_file_and_empty_sections_change_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    for text in ("", "algo:\n", "# nothing yet\n"):
        path.write_text(text)
        config = get_recipe("tiny_cpu")
        C.load_config_file(config, path)
        assert config == get_recipe("tiny_cpu")
