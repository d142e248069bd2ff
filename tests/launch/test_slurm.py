"""The heterogeneous Slurm job (trainer group + reward-server group) and the plain sbatch script.

No Slurm runs here. The rendered scripts are checked as text and, more to the point, executed by
bash with stand-ins for `srun`, `scontrol` and `torchrun` on PATH that record what they are asked
to run: so the tests see the commands each group would start, after the shell has expanded the
hostnames, and the trainer's `metaapo run` overrides are parsed back into a configuration."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest

from metaapo_nemo import config as C
from metaapo_nemo.launch import executors, slurm
from metaapo_nemo.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")
IMAGE = "/lustre/images/metaapo-nemo.sqsh"
TRAINER_HOSTS, REWARD_HOSTS = ["trn1", "trn2"], ["rm1", "rm2"]

SRUN = """
import json, os, subprocess, sys, time
VALUED = {"--output", "--error", "--container-image", "--container-mounts", "--container-workdir", "-w"}
args, opts, i = sys.argv[1:], {}, 0
while i < len(args) and args[i].startswith("-"):
    if args[i] in VALUED:
        opts[args[i]], i = args[i + 1], i + 2
    else:
        key, _, value = args[i].partition("=")
        opts[key], i = value, i + 1
cmd = args[i:]
env = {k: os.environ.get(k) for k in ("METAAPO_REWARD_URL", "METAAPO_RDZV_HOST", "METAAPO_REWARD_TOKEN")}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": "srun", "opts": opts, "cmd": cmd, "env": env}) + "\\n")
if cmd[:1] == ["hostname"]:
    print("10.0.0.1")
else:  # in the container, /nemo_run is a mount of the job directory; exec: the job script's kill reaches it
    rundir = os.environ.get("STUB_NEMO_RUN", "/nemo_run")
    cmd = [rundir + c[len("/nemo_run"):] if c.startswith("/nemo_run/") else c for c in cmd]
    os.execvp(cmd[0], cmd)
"""
SCONTROL = """
import json, os, sys
if sys.argv[1:2] == ["requeue"]:
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write(json.dumps({"prog": "scontrol", "argv": sys.argv[1:]}) + "\\n")
words = " ".join(sys.argv[1:]).replace("hostnames=", "hostnames ").split()
if words[:2] == ["show", "hostnames"]:
    print("\\n".join(words[2].split(",")))
"""
TORCHRUN = """
import json, os, pathlib, signal, sys, time
deadline = time.time() + 30  # a reward server started in the background logs its start first
while os.environ.get("STUB_AWAIT_SERVER") and '"prog": "python"' not in pathlib.Path(os.environ["STUB_LOG"]).read_text():
    assert time.time() < deadline, "the reward server stand-in never started"
    time.sleep(0.05)
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": "torchrun", "argv": sys.argv[1:], "token": os.environ.get("METAAPO_REWARD_TOKEN"),
                          "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}) + "\\n")
if "STUB_REQUEUE" in os.environ:  # the run checkpointed on the time-limit signal and asks to be run again
    [out] = [a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")]
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "requeue").write_text("iter_1_step_7\\n")
sys.exit(int(os.environ.get("STUB_TRAINER_EXIT", "0")))
"""
PYTHON = """
import json, os, signal, sys, time
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"prog": "python", "argv": sys.argv[1:], "token": os.environ.get("METAAPO_REWARD_TOKEN"),
                          "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}) + "\\n")
time.sleep(60)  # a server: runs until the job script stops it
"""
GETENT = """
import sys
print(f"10.0.0.{11 + ['trn1', 'trn2', 'rm1', 'rm2'].index(sys.argv[2])}  {sys.argv[2]}")
"""


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    """NeMo-Run files under tmp_path; its shell helper (invoke) reads stdin, which pytest refuses."""
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    before = run.config.get_nemorun_home()
    run.config.set_nemorun_home(str(tmp_path / "nemo_run"))
    yield
    run.config.set_nemorun_home(before)


def _run_with_stand_ins(script: Path, tmp_path: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, list]:
    """Execute an sbatch script as Slurm would, on the first trainer node, with recording stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN), ("python", PYTHON),
                       ("getent", GETENT)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{textwrap.dedent(body)}")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": ",".join(TRAINER_HOSTS + REWARD_HOSTS),
                 "SLURM_JOB_NODELIST_HET_GROUP_0": ",".join(TRAINER_HOSTS),
                 "SLURM_JOB_NODELIST_HET_GROUP_1": ",".join(REWARD_HOSTS)}
    full_env = {**os.environ, **slurm_env, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    done = subprocess.run(["bash", str(script), *args], env=full_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def _config(**reward):
    config = get_recipe("llama31_8b")
    C.apply_overrides(config, ["policy.hf_path=/lustre/models/tulu", "data.train=/lustre/d/train.jsonl",
                               "data.eval=/lustre/d/eval.jsonl", "rollout.engine=torch", "output_dir=/lustre/runs/x",
                               "algo.beta=0.2"])
    for key, value in reward.items():
        setattr(config.reward, key, value)
    return config


def _executor(tmp_path) -> run.SlurmExecutor:
    executor = fdl.build(executors.slurm(account="acct", partition="batch", nodes=2, container_image=IMAGE,
                                         container_mounts=["/lustre:/lustre"], job_dir=str(tmp_path / "jobs")))
    # Stand-ins answer at once: no pause between starting the groups, a 1 s watch loop.
    executor.wait_time_for_group_job, executor.monitor_group_job_wait_time = 0, 1
    return executor


def _het_job(tmp_path, config, reward=slurm.RewardGroup(nodes=2)) -> tuple[str, Path, Path]:
    """The dry-run het job: its sbatch text and file, and the job directory NeMo-Run mounts as /nemo_run
    (a dry run leaves it on this machine; a launch copies it to the tunnel's job_dir)."""
    with slurm.build_experiment(config, _executor(tmp_path), reward=reward, recipe="qwen25_7b") as exp:
        exp.dryrun(log=False, delete_exp_dir=False)
        [(_, sbatch), (trainer_name, _), (reward_name, _)] = executors.rendered_plan(exp)
        executor = exp.jobs[0].executor
    path = Path(executor.experiment_dir, f"{executor.job_name}_sbatch.sh")
    assert (trainer_name, reward_name) == ("/nemo_run/scripts/train-0.sh", "/nemo_run/scripts/train-1.sh")
    assert path.read_text() == sbatch
    return sbatch, path, Path(executor.job_dir)


def test_config_overrides_round_trip_through_metaapo_run_parsing():
    config = _config(url=["http://a:1", "http://b:2"], token="s3cret")
    config.data.max_eval_prompts = None
    config.output_dir = "123"  # a string that reads as a number must stay a string
    overrides = slurm.config_overrides(config, "tiny_cpu")
    assert "policy.hf_path=/lustre/models/tulu" in overrides and "algo.beta=0.2" in overrides
    assert "reward.url=['http://a:1', 'http://b:2']" in overrides and "output_dir='123'" in overrides
    assert "data.max_eval_prompts=None" in overrides and "task.enabled=False" in overrides
    rebuilt = get_recipe("tiny_cpu")
    C.apply_overrides(rebuilt, overrides)
    assert rebuilt == config
    assert slurm.config_overrides(config, "llama31_8b") != overrides  # only the differences are written


def _flags(group: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", group, re.M))


def test_het_sbatch_has_a_trainer_group_and_a_reward_group_with_its_own_nodes(tmp_path):
    sbatch, path, _ = _het_job(tmp_path, _config(model_dir="/lustre/models/rm"))
    trainer, reward = sbatch.split("#SBATCH hetjob\n")
    flags = [_flags(group) for group in (trainer, reward)]
    assert [(f["nodes"], f["ntasks-per-node"], f["gpus-per-node"]) for f in flags] == [("2", "1", "8"), ("2", "1", "1")]
    assert all(f["account"] == "acct" and f["partition"] == "batch" and "exclusive" in f for f in flags)
    sruns = [line for line in sbatch.splitlines() if line.startswith("srun --het-group")]
    assert [s.split()[1] for s in sruns] == ["--het-group=0", "--het-group=1"]
    assert all(f"--container-image {IMAGE} --container-mounts /lustre:/lustre," in s for s in sruns)
    assert sruns[0].endswith("bash /nemo_run/scripts/train-0.sh & pids[0]=$!")
    assert sruns[1].endswith("bash /nemo_run/scripts/train-1.sh & pids[1]=$!")
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1"' in sbatch
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_both_groups_get_the_time_limit_signal_requeue_whole_nodes_and_one_name_per_output_dir(tmp_path):
    sbatch, _, _ = _het_job(tmp_path, _config(model_dir="/lustre/models/rm"))
    name = "metaapo-" + __import__("hashlib").sha1(b"/lustre/runs/x").hexdigest()[:8]
    for i, flags in enumerate(_flags(group) for group in sbatch.split("#SBATCH hetjob\n")):
        assert (flags["signal"], flags["mem"], flags["cpus-per-task"], flags["time"]) == ("USR1@300", "0", "64", "04:00:00")
        assert "requeue" in flags and "exclusive" in flags and flags["dependency"] == "singleton"
        assert flags["job-name"] == f"{name}-{i}"  # a second job for /lustre/runs/x waits for this one
    assert "export TORCHX_MAX_RETRIES=3" in sbatch  # NeMo-Run's retries
    for key, value in slurm.CLUSTER_ENV.items():
        assert f"export {key}={value}\n" in sbatch


def test_het_sbatch_run_starts_torchrun_on_the_trainer_nodes_pointed_at_every_reward_node(tmp_path):
    config = _config(model_dir="/lustre/models/rm", token="s3cret")
    sbatch, path, job_dir = _het_job(tmp_path, config)
    assert "s3cret" not in sbatch + "".join(p.read_text() for p in job_dir.rglob("*.sh"))
    done, calls = _run_with_stand_ins(path, tmp_path, STUB_NEMO_RUN=str(job_dir), METAAPO_REWARD_TOKEN="s3cret",
                                      STUB_AWAIT_SERVER="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s3cret" not in done.stdout + done.stderr  # not echoed by the script's set -x
    groups = {c["opts"].get("--het-group"): c for c in calls if c["prog"] == "srun" and "--het-group" in c["opts"]}
    assert groups["0"]["opts"]["--container-image"] == IMAGE
    [server] = [c for c in calls if c["prog"] == "python"]
    assert server["argv"] == ["-m", "metaapo_nemo", "serve-reward", "--host", "0.0.0.0", "--port", "5000",
                              "--model", "/lustre/models/rm"]
    assert server["token"] == "s3cret" and server["usr1_ignored"]  # the token from the environment, not argv

    [torchrun] = [c for c in calls if c["prog"] == "torchrun"]
    assert torchrun["token"] == "s3cret" and torchrun["usr1_ignored"]  # Slurm's USR1 does not kill torchrun
    argv = torchrun["argv"]
    run_at = argv.index("-m")
    assert argv[:run_at] == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                             "--rdzv-endpoint=10.0.0.11:29500", "--rdzv-id=4242",
                             f"--log-dir=/lustre/runs/x/logs/job-4242-{os.uname().nodename}", "--redirects=3", "--tee=3"]
    assert argv[run_at:run_at + 5] == ["-m", "metaapo_nemo", "run", "--recipe", "qwen25_7b"]
    assert argv[-1] == "reward.url=http://rm1:5000,http://rm2:5000"
    trainer = get_recipe("qwen25_7b")
    C.apply_overrides(trainer, argv[run_at + 5:])  # what `metaapo run` does with them
    expected = _config(url="http://rm1:5000,http://rm2:5000")  # the token stays off the command line
    expected.trainer.checkpoint_signal = "SIGUSR1"
    assert trainer == expected  # the resolved configuration, with the reward group as its server


def test_a_het_job_without_a_token_generates_one_per_job_for_both_groups(tmp_path):
    _, path, job_dir = _het_job(tmp_path, _config(model_dir="/lustre/models/rm"))
    env = {k: v for k, v in os.environ.items() if k != "METAAPO_REWARD_TOKEN"}
    done, calls = _run_with_stand_ins(path, tmp_path, STUB_NEMO_RUN=str(job_dir), **env)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = {c["prog"]: c["token"] for c in calls if c["prog"] in ("python", "torchrun")}
    assert re.fullmatch(r"[0-9a-f]{32}", tokens["python"]) and tokens["torchrun"] == tokens["python"]
    assert tokens["python"] not in done.stdout + done.stderr


def test_a_job_whose_run_asks_for_a_requeue_is_requeued_and_a_failed_or_finished_one_is_not(tmp_path):
    config = _config(model_dir="/lustre/models/rm")
    config.output_dir = str(tmp_path / "run")
    _, path, job_dir = _het_job(tmp_path, config)
    # Past NeMo-Run's retries, so only the checkpoint rule can requeue.
    runs = {"checkpointed": dict(STUB_REQUEUE="1", STUB_TRAINER_EXIT="1"),
            "failed": dict(STUB_TRAINER_EXIT="1"),
            "finished": dict()}
    requeues = {}
    for what, env in runs.items():
        done, calls = _run_with_stand_ins(path, tmp_path, STUB_NEMO_RUN=str(job_dir), SLURM_RESTART_COUNT="3", **env)
        requeues[what] = [c["argv"] for c in calls if c["prog"] == "scontrol"]
        assert done.returncode == int(env.get("STUB_TRAINER_EXIT", 0)), done.stderr[-3000:]
        (tmp_path / "run" / "requeue").unlink(missing_ok=True)  # as the rerun removes it
    assert requeues == {"checkpointed": [["requeue", "4242"]], "failed": [], "finished": []}


def test_reward_group_needs_one_model_source_no_url_and_the_slurm_executor(tmp_path):
    for reward in (dict(), dict(model_dir="/m", reward_fn="pkg:fn"), dict(model_dir="/m", url="http://rm:1")):
        with pytest.raises(C.ConfigError, match="reward"):
            executors.check_config(_config(**reward), slurm.RewardGroup())
    local = fdl.build(executors.local_torchrun())
    with pytest.raises(C.ConfigError, match="needs the slurm executor"):
        with slurm.build_experiment(_config(reward_fn="pkg:fn"), local, reward=slurm.RewardGroup()):
            pass
    executors.check_config(_config(reward_fn="pkg:fn"), slurm.RewardGroup())  # the trainer gets reward.url


def test_plain_sbatch_runs_both_groups_in_the_container_and_returns_the_trainer_status(tmp_path):
    script = ROOT / "launcher_configs" / "metaapo.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    trainer, reward = text.split("#SBATCH hetjob\n")
    assert "#SBATCH --nodes=2" in trainer and "#SBATCH --gpus-per-node=8" in trainer
    assert "#SBATCH --nodes=1" in reward and "#SBATCH --gpus-per-node=1" in reward

    assert all(f"#SBATCH --{flag}\n" in group for flag in ("signal=USR1@300", "mem=0", "cpus-per-task=64", "exclusive")
               for group in (trainer, reward))
    assert "#SBATCH --requeue\n" in trainer and "#SBATCH --dependency=singleton\n" in trainer

    out = tmp_path / "run"
    mounts = f"/lustre:/lustre,{tmp_path}:{tmp_path}"
    env = dict(IMAGE=IMAGE, REWARD_MODEL="/lustre/models/rm", OUTPUT_DIR=str(out), STUB_TRAINER_EXIT="3",
               STUB_AWAIT_SERVER="1", MOUNTS=mounts)
    done, calls = _run_with_stand_ins(script, tmp_path, "policy.hf_path=/lustre/m", "algo.beta=0.2", **env)
    assert done.returncode == 3, done.stderr[-3000:]  # the trainer's status; the server was stopped
    groups = {c["opts"]["--het-group"]: c for c in calls if c["prog"] == "srun"}
    for group in groups.values():
        assert group["opts"]["--container-image"] == IMAGE and group["opts"]["--container-mounts"] == mounts
    [server] = [c for c in calls if c["prog"] == "python"]
    assert server["argv"] == ["-m", "metaapo_nemo", "serve-reward", "--host", "0.0.0.0", "--port", "5242",
                              "--model", "/lustre/models/rm"]  # 5000 + job id % 1000
    [torchrun] = [c for c in calls if c["prog"] == "torchrun"]
    assert server["usr1_ignored"] and torchrun["usr1_ignored"]
    assert re.fullmatch(r"[0-9a-f]{32}", server["token"]) and torchrun["token"] == server["token"]
    assert torchrun["argv"] == [
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.11:29500", "--rdzv-id=4242",
        f"--log-dir={out}/logs/job-4242", "--redirects=3", "--tee=3", "-m", "metaapo_nemo", "run",
        "--recipe", "llama31_8b", f"output_dir={out}", "trainer.checkpoint_signal=SIGUSR1",
        "reward.url=http://rm1:5242,http://rm2:5242", "reward.reward_fn=None", "reward.model_dir=None",
        "policy.hf_path=/lustre/m", "algo.beta=0.2"]
    assert not [c for c in calls if c["prog"] == "scontrol"]  # it failed before any checkpoint


def test_plain_sbatch_requeues_a_run_that_asks_for_it_and_not_a_failed_or_finished_one(tmp_path):
    script = ROOT / "launcher_configs" / "metaapo.sbatch"
    env = dict(IMAGE=IMAGE, REWARD_MODEL="/lustre/models/rm", OUTPUT_DIR=str(tmp_path / "run"),
               MOUNTS=f"{tmp_path}:{tmp_path}")
    requeues = []
    for run_env in (dict(STUB_REQUEUE="1", STUB_TRAINER_EXIT="1"), dict(STUB_TRAINER_EXIT="1"), dict()):
        done, calls = _run_with_stand_ins(script, tmp_path, **env, **run_env)
        assert done.returncode == int(run_env.get("STUB_TRAINER_EXIT", 0)), done.stderr[-3000:]
        requeues.append([c["argv"] for c in calls if c["prog"] == "scontrol"])
        (tmp_path / "run" / "requeue").unlink(missing_ok=True)
    assert requeues == [[["requeue", "4242"]], [], []]


def test_launcher_configs_parse_and_the_python_api_dry_runs_a_het_job(tmp_path, capsys):
    for script in ("local_torchrun.sh", "slurm.sh", "slurm_reward_group.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "launcher_configs" / script)]).returncode == 0
    sys.path.insert(0, str(ROOT / "launcher_configs"))
    try:
        import slurm_experiment
    finally:
        sys.path.remove(str(ROOT / "launcher_configs"))
    argv = ["--account", "acct", "--image", IMAGE, "--reward-nodes", "1", "--job-dir", str(tmp_path / "jobs"),
            "--dryrun", "reward.model_dir=/lustre/models/rm", "policy.hf_path=/lustre/m", "data.train=/lustre/t.jsonl",
            "data.eval=/lustre/e.jsonl", "rollout.engine=torch"]
    assert slurm_experiment.main(argv) == 2  # the recipe's output_dir is relative
    assert "output_dir=results/llama31_8b is relative" in capsys.readouterr().err
    argv.append("output_dir=/lustre/runs/x")
    assert slurm_experiment.main(argv) == 0
    assert "srun --het-group=1" in capsys.readouterr().out
    assert slurm_experiment.main(argv + ["--nodes", "1", "--gpus-per-node", "4"]) == 2
    assert "4 ranks (1 node(s) x 4) is not a multiple of trainer.tensor_model_parallel_size=8" in \
        capsys.readouterr().err


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_cli_reward_group_dryrun_shows_both_groups_and_the_trainer_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NEMORUN_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [str(NEMO), "llm", "metaapo", "--recipe", "llama31_8b", "--dryrun", "run.executor=slurm",
         "run.executor.nodes=2", f"run.executor.container_image={IMAGE}",
         f"run.executor.tunnel.job_dir={tmp_path}/jobs",
         "run.reward_nodes=1", "reward.model_dir=/lustre/models/rm", "policy.hf_path=/lustre/m",
         "data.train=/lustre/t.jsonl", "data.eval=/lustre/e.jsonl", "rollout.engine=torch"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "#SBATCH hetjob" in text and "srun --het-group=1" in text
    assert "serve-reward --host 0.0.0.0 --port 5000 --model /lustre/models/rm" in text
    assert "exec torchrun --nnodes=2 --nproc-per-node=8" in text and '"reward.url=${METAAPO_REWARD_URL}"' in text
    assert "Dry run for metaapo: nothing was submitted" in text


def test_a_slurm_submission_leaves_the_tensorrt_llm_check_to_the_job():
    config = get_recipe("llama31_8b")  # rollout.engine=trtllm; this machine has no tensorrt_llm
    C.apply_overrides(config, ["policy.hf_path=/lustre/p", "data.train=/lustre/t.jsonl", "data.eval=/lustre/e.jsonl",
                               "reward.url=http://rm:5000"])
    with pytest.raises(C.ConfigError, match="tensorrt_llm is not installed here"):
        executors.check_config(config, None)
    executors.check_config(config, None, on_this_machine=False)  # the job's container has it


@pytest.mark.parametrize("output_dir, problem", [
    ("runs/x", "error: OUTPUT_DIR=runs/x is relative: give an absolute path on the shared filesystem"),
    ("/scratch/x", "error: OUTPUT_DIR=/scratch/x is under none of MOUNTS=/lustre:/lustre: add its folder to MOUNTS"),
], ids=["relative", "unmounted"])
def test_plain_sbatch_refuses_an_output_dir_that_would_not_outlive_the_job(tmp_path, output_dir, problem):
    script = ROOT / "launcher_configs" / "metaapo.sbatch"
    done, calls = _run_with_stand_ins(script, tmp_path, IMAGE=IMAGE, OUTPUT_DIR=output_dir, MOUNTS="/lustre:/lustre")
    assert done.returncode == 2 and problem in done.stderr, done.stderr[-2000:]
    assert not [c for c in calls if c["prog"] in ("srun", "torchrun")]
