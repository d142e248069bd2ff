"""The prepared GPU check (issue 6): what only a CUDA machine can show, as one JSON line.

    python tests/gpu/check.py [--out DIR] [--work DIR]   # on the GPU machine, via tests/gpu/check.sh
    python tests/gpu/check.py --cpu-smoke                # the same code, tiny sizes, on the CPU

Parts, each in its own process with its own time limit, so that a crash, an out-of-memory or a hang
in one is recorded as that part's error string and the others still run:
  parity    Megatron GPTModel (build_gpt_model + load_hf_into_model) against transformers'
            LlamaForCausalLM, same weights, same device, fp32 and bf16: max |logit difference|.
  dpo       a random ~1B-parameter Llama, DPO train steps through MegatronPolicy.train_step in
            bf16: tokens/s, MFU, peak GPU memory; then, on CUDA, a small model's losses with the
            distributed optimizer and full recomputation against without them.
  decode    tests/gpu/decode_bench.py (the torch engine's decode at K=8 against transformers'
            generate); its JSON line is merged as it is.
  pipeline  `python -m metaapo_nemo run --recipe tiny_cpu`, shrunk (tests/helpers.py), end to end.
--cpu-smoke runs parity, dpo and decode with tiny sizes (CUDA-only numbers null) and skips the
pipeline, which tests/test_pipeline.py covers on the CPU.

The JSON is also written to OUT/result.json after every part, so check.sh can print what was
measured even if this process is killed. Part logs go to OUT/<part>.log; bulky outputs (the
pipeline's checkpoints) go to WORK, since the device tool brings back at most 8 files from $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# check.sh must finish within 6 minutes on the device: wheels ~10 s, this script at most BUDGET_S
# (a part starts only with 15 s left and gets at most what is left), check.sh's fallback a second.
BUDGET_S = 310
# Per part: time limit in s; the comment is the estimate on one H200 (none of it has run on one).
LIMITS = {
    "parity": 90,  # ~20 s: imports and CUDA start ~10 s, two tiny models
    "dpo": 150,  # ~60 s: 1.1B weights drawn on the host ~20-30 s, optimizer, 2 + 5 steps of 32k tokens
    "decode": 110,  # ~60-90 s: decode_bench.py's own sizes (it says under 90 s)
    "pipeline": 120,  # ~60 s: shrunk tiny_cpu run (SFT 40 steps, 2 iterations) with its reward server
}
SMOKE_LIMIT_S = 90
RESULT_PREFIX = "RESULT "  # a part's last stdout line: RESULT {json}

# Peak dense bf16 tensor throughput of the H100 SXM and H200 (NVIDIA's datasheets: 1979 TFLOP/s
# "with sparsity", half of it dense), keyed by a part of torch's device name ("NVIDIA H200",
# "NVIDIA H100 80GB HBM3"). Other GPUs (the H100 PCIe and NVL are slower): MFU is left null.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 80GB HBM3": 989e12}

DPO_SIZES = {  # a random Llama of ~1.1B parameters (0.97B in the decoder), GQA 32/8
    "gpu": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
                ffn_hidden_size=8192, prompt=512, response=512, pairs_per_step=16, pairs_per_micro=4,
                warmup_steps=2, timed_steps=5),
    "smoke": dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, prompt=16, response=16, pairs_per_step=4, pairs_per_micro=2,
                  warmup_steps=1, timed_steps=2),
}


def _llama_config(cfg_sizes: dict):
    from metaapo_nemo.models.config import ModelConfig

    keys = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
    return ModelConfig(**{k: cfg_sizes[k] for k in keys},
                       max_position_embeddings=cfg_sizes["prompt"] + cfg_sizes["response"])


def part_parity(smoke: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.models.gpt import build_gpt_model
    from metaapo_nemo.models.hf_convert import load_hf_into_model, model_config_from_hf
    from metaapo_nemo.models.logprobs import full_logits
    from tests.helpers import spread_weights

    # fp32 must mean fp32 on both sides: no TF32 matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed()
    # GQA (8 heads over 2 key/value groups), widened weights so that a wrong mapping shows.
    hf = spread_weights(LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256)), seed=0)
    cfg = model_config_from_hf(hf.config)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}  # fp32, before hf moves and casts
    tokens = torch.randint(0, cfg.vocab_size, (3, 32 if smoke else 200), generator=torch.Generator().manual_seed(1))
    out = {}
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = build_gpt_model(cfg, dtype=dtype)
        load_hf_into_model(model, cfg, weights)
        hf_on = hf.to(device=device, dtype=dtype)
        with torch.no_grad():
            ours = full_logits(model, tokens).float()
            ref = hf_on(tokens.to(device)).logits.float()
        out[f"logits_max_diff_{key}"] = (ours - ref).abs().max().item()
        out[f"logits_max_abs_{key}"] = ref.abs().max().item()  # the scale the difference is measured against
        out["parity_device"] = str(ours.device)
        del model
    return out


def part_dpo(smoke: bool) -> dict:
    import torch
    from megatron.core.utils import unwrap_model

    from metaapo_nemo.algorithm.objectives import Objective, PairLogps
    from metaapo_nemo.data.batching import collate
    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.models.logprobs import sequence_logprobs
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    size = DPO_SIZES["smoke" if smoke else "gpu"]
    cuda = torch.cuda.is_available()
    init_distributed()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = _llama_config(size)
    started = time.perf_counter()
    # Megatron mixed precision (bf16 weights, fp32 main weights and gradients): the same code path
    # in the CPU smoke run as on the GPU.
    precision = "bf16"
    policy = MegatronPolicy(cfg, None, pad_id=0, optim=OptimConfig(lr=1e-6, clip_grad=1.0), precision=precision)
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in policy.model.parameters())
    embedding = unwrap_model(policy.model).embedding.word_embeddings.weight.numel()

    steps = size["warmup_steps"] + size["timed_steps"]
    n_pairs = size["pairs_per_step"] * steps
    gen = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[int]:
        return torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist()

    prompts = [draw(size["prompt"]) for _ in range(n_pairs)]
    chosen = [(p, draw(size["response"])) for p in prompts]
    rejected = [(p, draw(size["response"])) for p in prompts]
    # The loop scores the reference once per data slice, outside the train step: constants here.
    ref_chosen, ref_rejected = torch.zeros(n_pairs), torch.zeros(n_pairs)
    objective = Objective("dpo", beta=0.1)

    def make_batch(idx):
        return collate([chosen[i] for i in idx] + [rejected[i] for i in idx], 0)

    def loss_fn(idx, logp, ntok):
        n = len(idx)
        loss = objective.loss(PairLogps(logp[:n], logp[n:], ref_chosen[idx], ref_rejected[idx]))
        return loss.sum(), {"loss": float(loss.detach().sum())}

    timed_s, timed_tokens, step_s = 0.0, 0.0, []
    for step in range(steps):
        idx = list(range(step * size["pairs_per_step"], (step + 1) * size["pairs_per_step"]))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = policy.train_step(idx, make_batch, loss_fn, micro_batch_size=size["pairs_per_micro"])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if step >= size["warmup_steps"]:
            timed_s += seconds
            timed_tokens += stats["tokens"]
            step_s.append(seconds)
    tokens_per_s = timed_tokens / timed_s
    seq = size["prompt"] + size["response"]
    # Model FLOPs per token, forward + backward (PaLM's appendix B): 6 per weight of every matmul
    # (the decoder and the LM head, counted at every position; the input embedding is a lookup),
    # plus 12 * layers * hidden * seq for the attention scores and the weighted sum over the full
    # seq x seq square. Causal attention needs only half of that square, so the second term
    # overstates the work by 2x; it is 6% of the total at these sizes (0.40 of 6.63 GFLOP).
    flops_per_token = 6 * (params - embedding) + 12 * cfg.num_layers * cfg.hidden_size * seq
    gpu = torch.cuda.get_device_name(0) if cuda else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    final_loss = stats["loss"] / size["pairs_per_step"]
    # The two layouts of shared-prompt batches on this device: one row by segments (collate's
    # choice here) against masked rows, the same sequences; bf16, so compare with the scale.
    policy.model.eval()
    with torch.no_grad():
        pairs = chosen[:4] + rejected[:4]
        by_segments, masked = (sequence_logprobs(policy.model, collate(pairs, 0, segments=s))[0] for s in (True, False))
    del policy
    scale_features = _scale_features(make_batch, loss_fn, size) if cuda else {}
    return {
        "dpo_model_params": params,
        "dpo_sequence_tokens": seq,
        "dpo_tokens_per_step": timed_tokens / len(step_s),
        "dpo_build_seconds": round(build_s, 2),
        "dpo_step_seconds": round(sorted(step_s)[len(step_s) // 2], 4),
        "dpo_train_tokens_per_s": round(tokens_per_s, 1),
        "dpo_flops_per_token": flops_per_token,
        "dpo_train_mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
        "dpo_peak_memory_gib": round(peak_memory, 2) if cuda else None,
        "dpo_precision": precision,
        "dpo_final_loss": final_loss,
        "dpo_segments_vs_mask_max_abs": (by_segments - masked).abs().max().item(),
        "dpo_logp_max_abs": masked.abs().max().item(),
        **scale_features,
    }


def _scale_features(make_batch, loss_fn, size: dict) -> dict:
    """What the 8B recipes switch on, on the GPU (tests/models/test_gpt.py covers the CPU): Megatron's
    distributed optimizer and full activation recomputation (uniform, 1 layer per unit). A 4-layer model with the same weights
    takes the same 3 DPO steps with them and without; the losses must agree to bf16 rounding."""
    import torch

    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    try:
        cfg = _llama_config({**size, "hidden_size": 256, "num_layers": 4, "ffn_hidden_size": 1024})
        optim = OptimConfig(lr=1e-4, clip_grad=1.0)
        plain = MegatronPolicy(cfg, None, pad_id=0, optim=optim, precision="bf16")
        weights = plain.hf_state_dict()
        scaled = MegatronPolicy(cfg, weights, pad_id=0, optim=optim, precision="bf16", distributed_optimizer=True,
                                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        losses = {"plain": [], "scaled": []}
        for step in range(3):
            idx = list(range(step * size["pairs_per_micro"], (step + 1) * size["pairs_per_micro"]))
            for name, policy in (("plain", plain), ("scaled", scaled)):
                losses[name].append(policy.train_step(idx, make_batch, loss_fn, micro_batch_size=2)["loss"])
        torch.cuda.synchronize()
        diff = max(abs(a - b) for a, b in zip(losses["plain"], losses["scaled"]))
        return {"dpo_distributed_recompute_losses": losses, "dpo_distributed_recompute_max_loss_diff": diff,
                "dpo_distributed_recompute_error": None}
    except Exception as e:  # recorded; the measurement above stands
        return {"dpo_distributed_recompute_error": f"{type(e).__name__}: {e}"[:600]}


PARTS_IN_PROCESS = {"parity": part_parity, "dpo": part_dpo}


def _run_in_process(name: str, smoke: bool) -> None:
    """The child's side: run one part, print RESULT {json} as the last line."""
    import torch

    if smoke:
        torch.set_num_threads(1)
    sys.path.append(str(ROOT))  # tests.helpers; appended so that PYTHONPATH's metaapo_nemo wins
    result = PARTS_IN_PROCESS[name](smoke)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class Interrupted(Exception):
    """SIGTERM, from check.sh's outer `timeout`: stop, and still print what was measured."""


def _on_sigterm(signum, frame):
    raise Interrupted("check.py received SIGTERM (check.sh's outer time limit)")


def _run_child(command: list[str], timeout: float, log: Path, env: dict, cwd: Path = ROOT) -> tuple[str | None, str]:
    """Run `command` in a process group of its own; (error or None, stdout). On timeout or SIGTERM
    the whole group (the pipeline's reward server too) is killed. A group, not a session: the
    device tool ends a command's leftover processes, except those in sessions of their own."""
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=cwd, env=env,
                                process_group=0)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            log_file.write(stdout)
            return f"timed out after {timeout:.0f} s (log: {log.name})", stdout
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        log_file.write(stdout)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        return f"exit status {proc.returncode}: " + " | ".join(tail)[-600:], stdout
    return None, stdout


def _last_json(stdout: str, prefix: str = "") -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith(prefix):
            try:
                value = json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _environment() -> dict:
    from importlib import metadata

    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
    }


def _pipeline_command(work: Path) -> tuple[list[str], dict, Path]:
    """The shrunk tiny_cpu run, with an environment and a working directory under which
    `metaapo_nemo.recipes` resolves: the package maps it onto the top-level recipes/ folder at
    install time, and on the device the repository is only on the path, not installed. So the run
    imports a copy of the package with recipes/ inside, from its own folder (`python -m` puts the
    working directory first on sys.path)."""
    from tests.helpers import SHRUNK_TINY_CPU

    package = work / "pkg" / "metaapo_nemo"
    shutil.rmtree(package.parent, ignore_errors=True)
    shutil.copytree(ROOT / "metaapo_nemo", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "recipes", package / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    out = work / "pipeline"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
               f"task.cache_dir={work / 'pipeline_cache'}", *SHRUNK_TINY_CPU]
    path = os.pathsep.join(p for p in (str(package.parent), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return command, {**os.environ, "PYTHONPATH": path}, package.parent


def _pipeline_result(work: Path, out: Path) -> dict:
    summary_path = work / "pipeline" / "summary.json"
    summary = json.loads(summary_path.read_text())
    shutil.copy(summary_path, out / "pipeline_summary.json")
    return {
        "pipeline_finished": summary["finished"],
        "pipeline_reward_initial": summary["reward_initial"],
        "pipeline_reward_final": summary["reward_final"],
        "pipeline_seconds": summary["seconds"],
        "pipeline_tokens_per_second": summary["tokens_per_second"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; skips the pipeline")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check", help="logs and result.json")
    parser.add_argument("--work", default="/tmp/gpu_check_work", help="bulky outputs (the pipeline's run)")
    parser.add_argument("--part", choices=sorted(PARTS_IN_PROCESS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        _run_in_process(args.part, args.cpu_smoke)
        return 0

    started = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    sys.path.append(str(ROOT))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if smoke:
        env["OMP_NUM_THREADS"] = "1"
    result: dict = {"cpu_smoke": smoke, **_environment(), "errors": {}, "part_seconds": {}}
    parts = ["parity", "dpo", "decode"] + ([] if smoke else ["pipeline"])
    interrupted = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    flag = ["--cpu-smoke"] if smoke else []
    for name in parts:
        left = BUDGET_S - (time.perf_counter() - started)
        limit = SMOKE_LIMIT_S if smoke else min(LIMITS[name], left)
        part_started = time.perf_counter()
        error, values = None, {}
        if limit < 15:
            error = f"skipped: the check's {BUDGET_S} s budget was spent"
        elif name == "decode" and not (HERE / "decode_bench.py").exists():
            error = "decode_bench.py missing"
        else:
            try:
                cwd = ROOT
                if name == "pipeline":
                    command, part_env, cwd = _pipeline_command(work)
                    part_env.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
                elif name == "decode":
                    command, part_env = [sys.executable, str(HERE / "decode_bench.py"), *flag], env
                else:
                    command, part_env = [sys.executable, str(Path(__file__).resolve()), "--part", name, *flag], env
                error, stdout = _run_child(command, limit, out / f"{name}.log", part_env, cwd)
                if name == "pipeline":
                    values = {} if error else _pipeline_result(work, out)
                else:
                    values = _last_json(stdout, RESULT_PREFIX if name in PARTS_IN_PROCESS else "") or {}
                    if not values and not error:
                        error = "printed no JSON line"
                    error = error or values.pop("error", None)
            except Interrupted as e:
                error = interrupted = str(e)
            except Exception as e:  # a part's failure is its error string, never the end of the check
                error = f"{type(e).__name__}: {e}"
        result.update(values)
        result["errors"][name] = error
        result["part_seconds"][name] = round(time.perf_counter() - part_started, 1)
        result["total_seconds"] = round(time.perf_counter() - started, 1)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if interrupted:
            break
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
