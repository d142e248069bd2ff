#!/usr/bin/env bash
# The prepared GPU check (issue 6, Deliver 5): what only a CUDA machine can show, in under 6 minutes,
# printed as ONE JSON line, the last line of stdout. It has NOT run on a GPU yet: no session of
# this project has been lent a device so far.
#
# How the lead runs it, from a session that is lent a device (one H200, 15 minutes all told):
#   1. here, with pip access:   bash tests/gpu/fetch_wheels.sh     (tests/gpu/wheels/, 7.8 MiB)
#   2. the device tool's `run`:  command "bash tests/gpu/check.sh", carry ["tests/gpu/wheels"],
#                                timeout_s 420; then give_back unless rerunning at once.
# Elsewhere (any CUDA machine with the repository): bash tests/gpu/check.sh
# On a CPU, tiny sizes, no pipeline (tests/test_gpu_check.py): bash tests/gpu/check.sh --cpu-smoke
# PYTHON=... picks the interpreter (default: python3 on PATH, the one holding torch on the device).
#
# What it measures (tests/gpu/check.py has the details and each part's time limit and estimate):
# Megatron vs transformers logits on the GPU in fp32 and bf16; the DPO train step of a random
# 1.1B Llama in bf16 (tokens/s, MFU, peak memory); the torch engine's decode at K=8 against
# transformers' generate (tests/gpu/decode_bench.py); the tiny pipeline end to end on CUDA.
# A part that fails records its error string in the JSON; the others still run.
#
# The device has Python 3.12, torch 2.11 with CUDA, transformers 5.x and no network; the carried
# wheels (megatron-core, fastapi, uvicorn, pydantic, ...) are installed offline into WORK/site, only
# those it lacks. Logs and result.json go to $OUT (or /tmp/gpu_check): at most 8 files, since the
# device tool brings back no more; the pipeline's run directory stays in WORK.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
export OUT
mkdir -p "$OUT" "$WORK"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

"$PYTHON" tests/gpu/install_wheels.py tests/gpu/wheels "$WORK/site" >"$OUT/install.log" 2>&1 \
  || echo "wheel install failed (see install.log); the check runs with what is installed"
grep -E "install$|unmet" "$OUT/install.log" || true
export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# check.py keeps its own 310 s budget; this outer limit only catches a hang of check.py itself.
limit=()
if command -v timeout >/dev/null; then limit=(timeout 325); fi
"${limit[@]}" "$PYTHON" tests/gpu/check.py --out "$OUT" --work "$WORK" "$@"
status=$?
if (( status != 0 )); then  # the last line must still be the JSON: what check.py recorded so far
  "$PYTHON" - "$OUT/result.json" "$status" <<'PY'
import json, sys
from pathlib import Path
path, status = Path(sys.argv[1]), int(sys.argv[2])
result = json.loads(path.read_text()) if path.exists() else {}
result["check_exit_status"] = status
print(json.dumps(result))
PY
fi
