#!/usr/bin/env bash
# Downloads, here (x86-64, pip registry access), the wheels that tests/gpu/check.sh installs offline
# on the GPU machine: what metaapo_nemo imports at run time that the machine's image may lack
# (Python 3.12, torch 2.11 + CUDA, transformers 5.x, numpy, packaging, safetensors, tokenizers,
# matplotlib, pyarrow, rich, httpx, click, h11 are there; megatron-core, fastapi, uvicorn,
# pydantic are not). Exact pins: the versions this project is tested with on the CPU machine.
# check.sh installs only those the machine lacks or holds too old for the others' requirements.
#   bash tests/gpu/fetch_wheels.sh        (writes tests/gpu/wheels/, ignored by git; < 60 MiB)
set -euo pipefail
cd "$(dirname "$0")"
DEST=wheels
LIMIT_MIB=60
PINS=(
  megatron-core==0.16.1  # a cp312 manylinux_2_24/2_28 build (2.5 MiB); needs torch>=2.6, numpy, packaging
  fastapi==0.163.2 starlette==0.52.1 uvicorn==0.54.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16, newer than torch's image may hold
  h11==0.16.0 click==8.5.1 httpx==0.27.2 httpcore==1.0.9 anyio==4.9.0 sniffio==1.3.1 idna==3.20
  certifi==2026.10.19.post1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
)
# Not carried: matplotlib (plots.png only, drawn after summary.json is written; 9 MiB plus its own
# needs) and pyarrow (imported only to read .parquet data, which the tiny pipeline does not use;
# 40 MiB), both in the machine's image; safetensors and tokenizers come with its transformers.
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${PINS[@]}"
ls -1 "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
mib=$(python3 -c "print(f'{$total / 2**20:.1f}')")
echo "${#PINS[@]} wheels, $mib MiB in tests/gpu/$DEST"
if (( total > LIMIT_MIB * 2**20 )); then
  echo "error: the wheels exceed $LIMIT_MIB MiB, the check's share of what travels to the GPU machine" >&2
  exit 1
fi
