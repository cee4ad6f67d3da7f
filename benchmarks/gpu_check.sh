#!/usr/bin/env bash
# Issue 17's device check: run on a lent NVIDIA machine from the repository root (the `device` tool's `run`), e.g.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# That machine's image holds torch (CUDA), pandas, scikit-learn, scipy, safetensors, tensorboard, timm and pytest under
# python3 3.12; bctnb also needs faiss and fastcore there: download their cp312 manylinux wheels into .whl/ first (the
# device README's "Notes" give the pip download line). Everything lands under $OUT (comes back with the reply).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 BCTNB_NO_PROGRESS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
fi
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c 'import json; from bctnb.runs import environment; print(json.dumps(environment(), indent=1))' \
  | tee "$OUT/env.json"
# the CUDA correctness tests (tests/test_cuda.py; skipped on machines without a GPU)
timeout 400 python3 -m pytest -q tests/test_cuda.py tests/test_models.py::test_timm_backbone_trains_saves_and_loads -p no:cacheprovider -o addopts="-ra" \
  --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.txt"
# the GPU benchmark (benchmarks/bench_gpu.py): throughput, utilisation, method ratios, input pipeline, arcface_torch's
# step beside ours -> benchmarks/results/gpu.json, copied to $OUT so it comes back with the reply
timeout 330 python3 benchmarks/bench_gpu.py 2>&1 | tee "$OUT/bench_gpu.txt"
cp benchmarks/results/gpu.json "$OUT/gpu.json" 2>/dev/null || echo "bench_gpu.py wrote no gpu.json" | tee -a "$OUT/bench_gpu.txt"
