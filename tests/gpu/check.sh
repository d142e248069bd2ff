#!/usr/bin/env bash
# GPU check, prepared for a session that is lent a device (none was lent so far): the code paths
# that only a CUDA machine takes (no CPU patches, nccl process group, models moved to the GPU,
# collectives on GPU tensors). Run from the repository root on the GPU machine:
#   bash tests/gpu/check.sh            (about 3-5 minutes; writes to $OUT or /tmp/gpu_check)
set -euo pipefail
# The device machine has no internet: it uses its own CUDA torch, and the project's other packages
# (megatron-core, transformers, tokenizers, safetensors, fastapi, uvicorn, httpx, rich, matplotlib,
# pyarrow) must be there or travel as wheels (see the device tool's README: `.whl` + carry).
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, megatron.core, transformers, fastapi, uvicorn, httpx; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python - <<'PY' 2>&1 | tee "$OUT/parity.txt"
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.hf_convert import load_hf_into_model, model_config_from_hf
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.logprobs import full_logits
assert torch.cuda.is_available(), "no CUDA device"
init_distributed()
torch.manual_seed(0)
hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)).eval()
cfg = model_config_from_hf(hf.config)
model = build_gpt_model(cfg)
load_hf_into_model(model, cfg, hf.state_dict())
tokens = torch.randint(0, 128, (2, 12))
with torch.no_grad():
    ours = full_logits(model, tokens.cuda()).float().cpu()
    ref = hf(tokens).logits
print("device", next(model.parameters()).device, "max |logit diff| vs transformers (GPU vs CPU):",
      (ours - ref).abs().max().item())
PY
OMP_NUM_THREADS=4 python -m metaapo_nemo run --recipe tiny_cpu output_dir="$OUT/run" task.cache_dir="$OUT/cache" \
  task.sft_steps=100 task.num_train_pairs=192 algo.iterations=2 2>&1 | tail -n 8 | tee "$OUT/run.txt"
python -c "import json; s=json.load(open('$OUT/run/summary.json')); print({k: s[k] for k in ('reward_initial','reward_final','annotation_ratio','seconds','tokens_per_second')})"
