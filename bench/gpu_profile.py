"""Where a TorchForce step's GPU time goes: torch profiler over energy + forces of the graph-safe exports
(the cell-list path CUDA graphs capture) of the demo's spline and neural models at 64k beads (8x8x4 replicas),
on CUDA, float32 (as `bench/gpu_perf.sh` times them). Prints the top operators by CUDA time. Usage (GPU machine, after the
wheel install of bench/gpu_perf.sh): python bench/gpu_profile.py"""
import os
import sys
import time

import torch

sys.path.insert(0, "bench")
import run_bench as rb  # noqa: E402
from enpcg.h5md import read_h5md  # noqa: E402
from enpcg.models import load_model  # noqa: E402
from openmm_plugin.export import graph_safe_model, script_model  # noqa: E402

DEV = os.environ.get("DEV", "cuda")
spline = load_model("out/demo/models/spline")
neural = load_model("out/demo/models/neural")
last = read_h5md("out/demo/cg/cg.h5", frames=[-1], require_forces=False)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


for size in sys.argv[1:] or ["64k"]:
    top, pos, box = rb.replicate(spline.topology, last.positions[0], last.box[0], rb.SHAPES[size])
    for name, m in (("spline", spline), ("neural", neural)):
        model = graph_safe_model(rb.rebuild(m, top), box, pos)
        mod = torch.jit.freeze(script_model(model, dtype="float32").to(DEV).eval())  # as openmm-torch runs it
        x = torch.tensor(pos, dtype=torch.float32, device=DEV)
        b = torch.tensor(box, dtype=torch.float32, device=DEV)

        def call():
            xx = x.clone().requires_grad_(True)
            e = mod(xx, b)
            torch.autograd.grad(e, xx)

        for _ in range(5):
            call()
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            call()
        sync()
        print(f"\n=== {name}, {top.n_beads} beads: {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms per energy+forces "
              f"(eager launch, scripted)", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60),
              flush=True)
