"""Executors by name (`run.executor=local_torchrun | slurm`): what NeMo-Run resolves them to, the
torchrun command and sbatch script they render (dry runs, no Slurm here), the layout checks, the
`nemo llm metaapo ... --dryrun` plans, the paper recipes' TP/PP layouts and the container recipe."""
import os
import re
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest

from metaapo_nemo import config as C
from metaapo_nemo.launch import executors, slurm
from metaapo_nemo.launch.nemo_cli import RecipeRunContext
from metaapo_nemo.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")
IMAGE = "/lustre/images/metaapo-nemo.sqsh"


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    """Experiments (and their dry-run files) under a temporary NEMORUN_HOME, not ~/.nemo_run; NeMo-Run's
    shell helper (invoke) reads stdin, which pytest's capture refuses, so give it /dev/null."""
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    before = run.config.get_nemorun_home()
    run.config.set_nemorun_home(str(tmp_path / "nemo_run"))
    yield tmp_path / "nemo_run"
    run.config.set_nemorun_home(before)


def _slurm(tmp_path, **overrides) -> run.SlurmExecutor:
    executor = fdl.build(executors.slurm(account="acct", partition="batch", nodes=2, container_image=IMAGE,
                                         container_mounts=["/lustre:/lustre"], job_dir=str(tmp_path / "jobs")))
    for key, value in overrides.items():
        setattr(executor, key, value)
    return executor


def _plan(config, executor, **kwargs) -> list[tuple[str, str]]:
    with slurm.build_experiment(config, executor, **kwargs) as exp:
        exp.dryrun(log=False, delete_exp_dir=False)
        return executors.rendered_plan(exp)


def _llama():
    config = get_recipe("llama31_8b")
    C.apply_overrides(config, ["policy.hf_path=/lustre/models/tulu", "data.train=/lustre/d/train.jsonl",
                               "data.eval=/lustre/d/eval.jsonl", "reward.url=http://rm:5000", "rollout.engine=torch"])
    return config


def test_executor_names_resolve_to_the_registered_factories_with_cli_overrides():
    ctx = RecipeRunContext(name="metaapo")
    local = fdl.build(ctx.parse_executor("local_torchrun", "ntasks_per_node=3"))
    assert isinstance(local, run.LocalExecutor)
    assert (local.ntasks_per_node, local.launcher, local.env_vars["OMP_NUM_THREADS"]) == (3, "torchrun", "1")
    assert local.env_vars["PATH"] == str(Path(sys.executable).parent)  # torchrun of this environment

    cluster = fdl.build(ctx.parse_executor("slurm", "nodes=4", "account=acct", "partition=batch"))
    assert type(cluster) is run.SlurmExecutor  # NeMo-Run maps executors to schedulers by exact class
    assert (cluster.nodes, cluster.gpus_per_node, cluster.ntasks_per_node) == (4, 8, 8)
    assert (cluster.account, cluster.partition) == ("acct", "batch")
    assert (cluster.launcher, cluster.exclusive) == ("torchrun", True)
    assert cluster.container_image == executors.DEFAULT_CONTAINER_IMAGE
    assert cluster.container_image.startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    assert type(cluster.tunnel) is run.LocalTunnel  # submits from this (login) node

    remote = fdl.build(ctx.parse_executor("slurm(ssh_host=login1, ssh_user=me, job_dir=/lustre/me/jobs)",
                                          "env_vars={'HF_HUB_OFFLINE': '1'}"))
    assert (type(remote.tunnel), remote.tunnel.host, remote.tunnel.user) == (run.SSHTunnel, "login1", "me")
    assert remote.tunnel.job_dir == "/lustre/me/jobs" and remote.env_vars == {"HF_HUB_OFFLINE": "1"}


def test_local_torchrun_renders_torchrun_with_two_ranks_one_thread_each_running_the_same_config():
    config = get_recipe("tiny_cpu")
    C.apply_overrides(config, ["output_dir=/tmp/never", "algo.beta=0.2"])
    local = fdl.build(executors.local_torchrun(ntasks_per_node=2))
    with slurm.build_experiment(config, local) as exp:
        exp.dryrun(log=False, delete_exp_dir=False)
        [(title, command)] = executors.rendered_plan(exp)
        config_file = Path(exp.jobs[0].executor.job_dir, "configs", "train_fn_or_script")
        shipped = slurm.config_from_partial(run.core.serialization.zlib_json.ZlibJSONSerializer()
                                            .deserialize(config_file.read_text()))
    assert command.startswith("OMP_NUM_THREADS=1 torchrun ")
    argv = command.split()
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--nnodes") + 1] == "1"
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert "-m nemo_run.core.runners.fdl_runner" in command and command.endswith(str(config_file))
    assert shipped == config  # every rank builds the run from this serialised task


def test_slurm_single_group_sbatch_runs_the_trainer_script_with_nodes_image_and_mounts(tmp_path):
    plan = _plan(_llama(), _slurm(tmp_path))
    [(title, sbatch), (script_name, script)] = plan
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", sbatch, re.M))
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("2", "8", "1")  # 1 torchrun per node
    assert (flags["account"], flags["partition"], flags["time"]) == ("acct", "batch", "04:00:00")
    assert (flags["signal"], flags["mem"], flags["dependency"]) == ("USR1@300", "0", "singleton")
    assert "exclusive" in flags and "requeue" in flags and "#SBATCH hetjob" not in sbatch
    [srun] = [line for line in sbatch.splitlines() if line.startswith("srun ")]
    argv = srun.split()
    assert argv[argv.index("--container-image") + 1] == IMAGE
    mounts = argv[argv.index("--container-mounts") + 1].split(",")
    assert mounts[0] == "/lustre:/lustre" and mounts[1].endswith(":/nemo_run")
    assert argv[-2:] == ["bash", f"/nemo_run/scripts/{script_name.rsplit('/', 1)[1]}"]
    assert 'getent hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in sbatch  # rdzv by address
    assert "exec torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in script
    assert "reward.url=http://rm:5000" in script and "trainer.checkpoint_signal=SIGUSR1" in script
    job = tmp_path / "job.sbatch"
    job.write_text(sbatch)
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0


def test_a_slurm_output_dir_must_be_absolute_and_mounted_and_mounts_default_to_the_runs_folders(tmp_path, monkeypatch):
    config = _llama()
    with pytest.raises(C.ConfigError, match="output_dir=results/llama31_8b is relative: under Slurm .* "
                                            "e.g. output_dir=/lustre/\\$USER/metaapo"):
        executors.check_outputs(_slurm(tmp_path), config)
    config.output_dir = "/scratch/me/run"
    with pytest.raises(C.ConfigError, match="under none of the container mounts \\(/lustre\\)"):
        executors.check_outputs(_slurm(tmp_path), config)
    executors.check_outputs(_slurm(tmp_path, container_image=None), config)  # no container: the host's filesystem
    executors.check_outputs(_slurm(tmp_path, container_mounts=[]), config)  # the default mounts cover it
    monkeypatch.setenv("HF_HOME", "/lustre/hf")
    assert slurm.default_mounts(config) == ["/lustre/d:/lustre/d", "/lustre/hf:/lustre/hf",
                                            "/lustre/models/tulu:/lustre/models/tulu", "/scratch/me/run:/scratch/me/run"]
    config.data.train = "/lustre/train.jsonl"  # its folder /lustre covers the others under it
    assert slurm.default_mounts(config) == ["/lustre:/lustre", "/scratch/me/run:/scratch/me/run"]
    [(_, sbatch), _] = _plan(config, _slurm(tmp_path, container_mounts=[]))
    assert "--container-mounts /lustre:/lustre,/scratch/me/run:/scratch/me/run," in sbatch


def test_layout_checks_name_the_keys_to_fix(tmp_path):
    config = _llama()  # TP 8 x PP 1
    with pytest.raises(C.ConfigError, match="ntasks_per_node=8 but run.executor.gpus_per_node=4"):
        executors.check_layout(_slurm(tmp_path, gpus_per_node=4), config)
    with pytest.raises(C.ConfigError, match=r"4 ranks \(1 node\(s\) x 4\) is not a multiple of "
                                            r"trainer.tensor_model_parallel_size=8"):
        executors.check_layout(_slurm(tmp_path, nodes=1, gpus_per_node=4, ntasks_per_node=4), config)
    executors.check_layout(_slurm(tmp_path, nodes=3), config)  # 24 ranks: DP 3
    with pytest.raises(C.ConfigError, match="not a multiple"):
        executors.check_layout(fdl.build(executors.local_torchrun(ntasks_per_node=3)),
                               C.MetaAPOConfig(trainer=C.TrainerConfig(tensor_model_parallel_size=2)))


def test_a_real_submission_with_the_bare_ngc_base_image_is_refused(tmp_path):
    with pytest.raises(C.ConfigError, match="build containers/Dockerfile"):
        executors.check_submission(_slurm(tmp_path, container_image=executors.DEFAULT_CONTAINER_IMAGE))
    executors.check_submission(_slurm(tmp_path))


def test_an_invalid_plan_is_shown_with_notes_on_dryrun_and_refused_on_launch(tmp_path, capsys):
    from metaapo_nemo.launch.nemo_cli import to_partial

    ctx = RecipeRunContext(name="metaapo", dryrun=True, factory="llama31_8b")
    ctx.executor = _slurm(tmp_path, nodes=1, gpus_per_node=4, ntasks_per_node=4,
                          container_image=executors.DEFAULT_CONTAINER_IMAGE)
    executors.launch(ctx, to_partial(_llama()))
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=4" in out and "--nproc-per-node=4" in out
    assert "note: this plan cannot run yet: 4 ranks (1 node(s) x 4) is not a multiple" in out
    assert "note: this plan cannot run yet: run.executor.container_image is the NGC base image" in out
    ctx.dryrun = False
    with pytest.raises(C.ConfigError, match="is not a multiple"):
        executors.launch(ctx, to_partial(_llama()))


def test_paper_recipes_fill_one_8_gpu_node_per_model_replica_with_heads_divisible_by_tp():
    # (attention heads, KV heads) of Llama-3.1-8B and Qwen2.5-7B (their config.json)
    for name, heads, kv_heads, layout in (("llama31_8b", 32, 8, (8, 1)), ("qwen25_7b", 28, 4, (4, 2))):
        trainer = get_recipe(name).trainer
        tp, pp = trainer.tensor_model_parallel_size, trainer.pipeline_model_parallel_size
        assert (tp, pp) == layout and tp * pp == 8
        assert heads % tp == 0 and kv_heads % tp == 0


def _nemo(args, home):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NEMORUN_HOME": str(home)}
    return subprocess.run([str(NEMO), "llm", "metaapo", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_cli_slurm_dryrun_prints_the_sbatch_plan_and_submits_nothing(tmp_path):
    out = _nemo(["--recipe", "llama31_8b", "--dryrun", "run.executor=slurm", "run.executor.nodes=2",
                 "run.executor.account=acct", f"run.executor.container_image={IMAGE}",
                 "run.executor.container_mounts=['/lustre:/lustre']", f"run.executor.tunnel.job_dir={tmp_path}/jobs",
                 "policy.hf_path=/lustre/m", "data.train=/lustre/t.jsonl", "data.eval=/lustre/e.jsonl",
                 "reward.url=http://rm:5000", "rollout.engine=torch"], tmp_path / "home")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert re.search(rf"srun .*--container-image {IMAGE} --container-mounts /lustre:/lustre,", text)
    assert "exec torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in text
    assert '--rdzv-endpoint="${METAAPO_RDZV_HOST}:29500"' in text and "tensor_model_parallel_size=8" in text
    assert "Dry run for metaapo: nothing was submitted" in text
    assert not list(tmp_path.rglob("*_sbatch.sh"))  # the dry run's files are cleaned up


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_cli_local_torchrun_dryrun_renders_torchrun_with_nproc_per_node_2(tmp_path):
    out = _nemo(["--recipe", "tiny_cpu", "--dryrun", "run.executor=local_torchrun", "run.executor.ntasks_per_node=2",
                 "output_dir=/tmp/never"], tmp_path / "home")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"OMP_NUM_THREADS=1 torchrun .*--nnodes 1 --nproc-per-node 2 "
                     r".*-m nemo_run\.core\.runners\.fdl_runner", out.stdout)
    assert not Path("/tmp/never").exists()


def test_dockerfile_builds_on_an_ngc_trtllm_image_keeps_its_torch_and_checks_imports():
    text = (ROOT / "containers" / "Dockerfile").read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base == executors.DEFAULT_CONTAINER_IMAGE and base.startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    assert "FROM ${BASE_IMAGE}" in instructions
    runs = [line for line in instructions if line.startswith("RUN ")]
    [install] = [line for line in runs if "pip install" in line]
    assert "--constraint image-constraints.txt" in install
    assert not re.search(r"--upgrade|\s-U\s|--force-reinstall|--no-build-isolation", install)
    assert not any(re.search(r"pip install[^&]*\btorch\b", line) for line in runs)  # torch is pinned, never installed
    pins = next(line for line in runs if "image-constraints.txt" in line and "pip list" in line)
    assert "torch|" in pins and "tensorrt" in pins and "grep -q '^torch==' image-constraints.txt" in pins
    assert "assert torch.__version__ == before" in install  # the image's torch survived the install
    imports = "import torch, megatron.core, nemo_run, metaapo_nemo.launch.nemo_cli, metaapo_nemo.algorithm.metaapo"
    assert imports in install
    assert 'python -c "import tensorrt_llm;' in install


def test_a_slurm_job_refuses_a_token_on_the_command_line_and_a_local_reward_server_across_nodes(tmp_path):
    executor, config = _slurm(tmp_path), _llama()
    executors.check_reward(executor, config, None)  # a remote server every node reaches, no token in the config
    config.reward.token = "s3cret"
    with pytest.raises(C.ConfigError, match="unset it and export METAAPO_REWARD_TOKEN before submitting"):
        executors.check_reward(executor, config, None)
    config.reward.token, config.reward.url, config.reward.reward_fn = None, None, "m:f"
    with pytest.raises(C.ConfigError, match="run.executor.nodes=2 without reward.url: a local reward server"):
        executors.check_reward(executor, config, None)
    executors.check_reward(executor, config, slurm.RewardGroup(nodes=1, gpus_per_node=1, port=5000))
    executors.check_reward(_slurm(tmp_path, nodes=1), config, None)  # one node: rank 0's loopback serves all
