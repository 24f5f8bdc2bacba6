#!/bin/bash
# Performance benchmark on a lent GPU machine (torch 2.11+cu130 there, no network). Carry `.whl` (cp312 wheels
# of openmm 8.6.1, openmm-cuda-13 8.6.1, acellera-openmmtorch-cu13 1.10, vesin, vesin-torch) and `out/demo`
# (the demo's models and mapped data, from `make demo`). Installs the wheels into /tmp/site, checks the
# graph-safe cell list on the GPU, then runs bench/run_bench.py on the CUDA platform (1k, 8k, 64k, 256k
# beads; CUDA graphs on and off; every export checked against the Reference platform; GPU vs CPU MS-CG).
# The table goes to stdout and $OUT/bench_cuda.json.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python - <<'PY'
import torch, openmm, vesin_torch
import openmmtorch  # noqa: F401  (after torch)
torch.backends.cuda.matmul.allow_tf32 = False
from enpcg.cell_list import CellList
from enpcg.neighbors import PairList
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
print("cell list on CUDA equals vesin:", close(cells) == close(vesin), "overflow:", cells.overflowed())
print("openmm", openmm.__version__, [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
PY
python bench/run_bench.py --platform CUDA --json "$OUT"/bench_cuda.json
