#!/bin/bash
# Performance benchmark on a lent GPU machine (torch 2.11+cu130 there, no network). Carry `.whl` (cp312 wheels
# of openmm 8.6.1, openmm-cuda-13 8.6.1, acellera-openmmtorch-cu13 1.10, vesin, vesin-torch) and `out/demo`
# (the demo's models and mapped data, from `make demo`). Installs the wheels into /tmp/site, checks the
# graph-safe cell list on the GPU against vesin, then runs bench/run_bench.py on the CUDA platform: per simulated
# nanosecond (CG vs united-atom and equivariant references), fitting throughput and GPU vs CPU MS-CG first, then
# 1k, 8k, 64k, 256k beads (CUDA graphs on and off; every export checked against the Reference platform up to
# 8k). The log and the rows (written after each one) go to $OUT/bench_cuda.log and $OUT/bench_cuda.json.
# Without a GPU it dry-runs the same code paths on the CPU platform (1k beads, short timings) and says that
# the GPU rows are pending.
#   bash bench/gpu_perf.sh            # LIMIT=480 (seconds for run_bench), PY=python3
#   SIZES=8k,64k,256k ROWS=native,graphs,empty EXTRA=--skip-fit PROFILE=1 LIMIT=200 bash bench/gpu_perf.sh
#   SIZES=256k ROWS=native,graphs,empty EXTRA="--skip-fit --skip-ns" LIMIT=150 bash bench/gpu_perf.sh
set -u
OUT=${OUT:-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU here: dry run of the GPU script's code paths on the CPU platform (times mean nothing);"
    echo "every GPU row of bench/RESULTS.md stays pending"
    exec "$PY" bench/run_bench.py --platform CPU --dry-run --sizes 1k --seconds 0.2 --json "$OUT"/bench_dry.json
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" - <<'PY'
import time
import torch
import openmm
import vesin_torch  # noqa: F401  (registers its TorchScript classes)
import openmmtorch  # noqa: F401  (after torch)
from enpcg.neighbors import PairList
print("torch", torch.__version__, "openmm", openmm.__version__,
      [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())], flush=True)
n, rc = 20000, 1.0
L = (n / 7.0) ** (1 / 3)
x = torch.rand(n, 3, dtype=torch.float64, device="cuda") * L
box = torch.eye(3, dtype=torch.float64, device="cuda") * L
cells = PairList(n, rc, [], {"method": "cells", "box": (torch.eye(3) * L).tolist()}).cuda()
vesin = PairList(n, rc, [], "vesin")
def close(pl):
    f, i, j, d = pl(x.unsqueeze(0), box.unsqueeze(0))
    r = torch.linalg.norm(d, dim=-1)
    return sorted(zip(i[r < rc].tolist(), j[r < rc].tolist()))
same = close(cells) == close(vesin)
g = torch.cuda.CUDAGraph()
static = x.clone()
cells(static.unsqueeze(0), box.unsqueeze(0))  # warm-up outside the capture
torch.cuda.synchronize()
with torch.cuda.graph(g):
    out = cells(static.unsqueeze(0), box.unsqueeze(0))
static.copy_(torch.rand_like(static) * L)
g.replay()
torch.cuda.synchronize()
r = torch.linalg.norm(out[3], dim=-1)
replayed = sorted(zip(out[1][r < rc].tolist(), out[2][r < rc].tolist()))
x = static
print(f"cell list on CUDA: equals vesin {same}; captured in a CUDA graph and replayed on new positions, equals "
      f"vesin {replayed == close(vesin)}; overflow {cells.overflowed()}", flush=True)
PY
DYN=out/demo/dynamics/dynamics.json  # `enpcg calibrate --mode time_scale` of the demo's spline model, if carried
# TorchForce rows in float32 (as OpenMM users run CG models on GPUs); SIZES, ROWS (substrings of row names),
# EXTRA (more run_bench flags, e.g. --skip-fit) narrow a short rerun.
timeout "${LIMIT:-480}" "$PY" bench/run_bench.py --platform CUDA --seconds 1 --dtype float32 \
    --json "$OUT"/bench_cuda.json ${SIZES:+--sizes $SIZES} ${ROWS:+--rows $ROWS} ${EXTRA:-} \
    $([ -f $DYN ] && echo --dynamics $DYN) 2>&1 \
    | grep -v -i "warning" | tee "$OUT"/bench_cuda.log
# PROFILE=1: where a graph-safe TorchForce step's GPU time goes (torch profiler, 64k beads)
if [ "${PROFILE:-0}" = 1 ]; then
    timeout ${PROFILE_LIMIT:-90} "$PY" bench/gpu_profile.py 64k 2>&1 | grep -v -i "warn" | tee "$OUT"/profile.log
fi
