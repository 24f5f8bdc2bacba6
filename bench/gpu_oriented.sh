#!/bin/bash
# GPU check of oriented beads on a lent device machine (torch 2.11+cu130 there, no network): installs the
# carried cp312 wheels in .whl/ (openmm 8.6.1, openmm-cuda-13, acellera-openmmtorch-cu13, vesin, vesin-torch)
# into /tmp/site, then runs bench/oriented.py on CUDA and on the CPU of the same machine.
set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
python -c "import torch, openmm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'openmm', openmm.__version__, [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python bench/oriented.py --platform CUDA --molecules 64,216,1000 --steps 300 --fit
python bench/oriented.py --platform CPU --molecules 64,216 --steps 50
