"""The prepared GPU check (tests/gpu/) on the CPU: `check.sh --cpu-smoke` runs check.py's parts with
tiny sizes in subprocesses and ends with the one JSON line; check.sh parses; the wheels carried to the
GPU machine are pinned exactly, and the installer picks only what that machine lacks."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "tests" / "gpu"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = subprocess.run(["bash", str(GPU / "check.sh"), "--cpu-smoke"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "OUT": str(out),
                                         "GPU_CHECK_WORK": str(work), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def test_cpu_smoke_prints_every_key_with_cuda_only_numbers_null(smoke):
    result, out = smoke
    assert {"torch", "cuda", "gpus", "megatron_core", "transformers", "errors", "part_seconds", "total_seconds",
            "logits_max_diff_fp32", "logits_max_diff_bf16", "dpo_train_tokens_per_s", "dpo_train_mfu",
            "dpo_peak_memory_gib", "dpo_flops_per_token", "dpo_model_params"} <= result.keys()
    assert result["cpu_smoke"] and result["gpus"] == [] and result["cuda"] is None
    assert result["dpo_train_mfu"] is None and result["dpo_peak_memory_gib"] is None
    assert set(result["errors"]) == {"parity", "dpo", "decode"}  # the pipeline is skipped in smoke mode
    assert json.loads((out / "result.json").read_text()) == result


def test_parity_and_dpo_parts_run_without_error(smoke):
    result, _ = smoke
    assert result["errors"]["parity"] is None and result["errors"]["dpo"] is None
    assert result["dpo_train_tokens_per_s"] > 0 and result["dpo_final_loss"] > 0
    assert result["dpo_precision"] == "bf16"  # the GPU code path: Megatron mixed precision
    # One row by segments against masked rows: bf16 rounding in other groupings, at most 0.05
    # nats a token (test_bf16_model_logprobs_stay_close_to_fp32), over at most a whole sequence.
    assert result["dpo_segments_vs_mask_max_abs"] <= 0.05 * result["dpo_sequence_tokens"]


def test_megatron_logits_match_transformers_within_1e_4_in_fp32(smoke):
    result, _ = smoke
    assert result["logits_max_diff_fp32"] <= 1e-4
    assert result["logits_max_diff_bf16"] <= 0.1 * result["logits_max_abs_bf16"]


def test_decode_bench_json_is_merged_or_its_absence_recorded(smoke):
    result, _ = smoke
    if not (GPU / "decode_bench.py").exists():
        assert result["errors"]["decode"] == "decode_bench.py missing"
        return
    assert result["errors"]["decode"] is None
    assert {"engine_tokens_per_s", "engine_nograph_tokens_per_s", "hf_generate_tokens_per_s", "ratio"} <= result.keys()


def test_mfu_counts_six_flops_per_matmul_weight_plus_full_square_attention(smoke):
    result, _ = smoke
    size = _module("check").DPO_SIZES["smoke"]
    embedding = size["vocab_size"] * size["hidden_size"]
    seq = size["prompt"] + size["response"]
    assert result["dpo_flops_per_token"] == (6 * (result["dpo_model_params"] - embedding)
                                             + 12 * size["num_layers"] * size["hidden_size"] * seq)


def test_check_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(GPU / "check.sh")], check=True)


def test_fetch_wheels_pins_exact_versions():
    text = (GPU / "fetch_wheels.sh").read_text()
    block = re.search(r"^PINS=\((.*?)^\)", text, re.S | re.M).group(1)
    pins = [word for line in block.splitlines() for word in line.split("#")[0].split()]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.+]*", pin) for pin in pins), pins
    names = {pin.split("==")[0] for pin in pins}
    assert {"megatron-core", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core"} <= names


def test_installer_takes_absent_wheels_and_the_upgrades_they_require():
    choose = _module("install_wheels").choose
    wheels = {
        "pydantic": (Version("2.14.4"), [Requirement("typing-extensions>=4.16"), Requirement("annotated-types>=0.6")]),
        "typing-extensions": (Version("4.16.0"), []),
        "annotated-types": (Version("0.8.0"), []),
        "rich": (Version("15.0.0"), [Requirement("pygments<3")]),
    }
    installed = {"typing-extensions": Version("4.12.2"), "rich": Version("14.0.0"), "annotated-types": Version("0.7.0")}
    chosen, unmet = choose(wheels, installed)
    assert chosen == {"pydantic", "typing-extensions"}  # rich and annotated-types: present and good enough
    assert unmet == set()
    chosen, unmet = choose({"fastapi": (Version("1.0"), [Requirement("starlette>=0.46")])}, {})
    assert chosen == {"fastapi"} and len(unmet) == 1 and "starlette" in next(iter(unmet))
