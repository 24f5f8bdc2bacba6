#!/bin/bash
# Long glass runs on a lent GPU machine (torch 2.11+cu130 there, no network): installs the carried cp312
# wheels of openmm 8.6.1 and openmm-cuda-13 from .whl/ into /tmp/site, then runs the bead-spring polymer
# glass transition (examples/polymer_glass_transition.py) on the CUDA platform: 2 cooling rates 10x apart,
# 4 independent quenches each, all 8 quenches as parallel processes on the one GPU, then the fits.
# Work goes to /tmp/polymer_tg; summary.json, the plots and a tarball of the quench records land in $OUT.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/openmm-8.6.1-*.whl .whl/openmm_cuda_13-*.whl >/dev/null 2>&1 \
    || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import openmm; print('openmm', openmm.__version__, [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])"
TG=/tmp/polymer_tg
mkdir -p "$TG"
ARGS="--out $TG --chains ${CHAINS:-200} --length 10 --fast-rate ${FAST:-0.01} --rate-ratio 10 --quenches 4 --platform CUDA"
start=$(date +%s)
for rate in ${FAST:-0.01} $(python -c "print(f'{${FAST:-0.01}/10:g}')"); do
  for k in 0 1 2 3; do
    python examples/polymer_glass_transition.py $ARGS --only "$rate:$k" > "$TG/log_${rate}_$k.txt" 2>&1 &
  done
done
wait
echo "quenches done in $(( $(date +%s) - start )) s"
tail -n 2 "$TG"/log_*.txt
python examples/polymer_glass_transition.py $ARGS
cp "$TG"/summary.json "$TG"/glass_transition_*.png "$OUT"/
tar czf "$OUT"/polymer_tg_records.tgz --exclude 'checkpoint_*' -C /tmp polymer_tg
python -c "import json; print(json.dumps(json.load(open('$TG/summary.json'))['observables'], indent=1))"
