#!/usr/bin/env bash
# The paper's Table 1 on CIFAR-10 on one GPU: WRN-16-1, the paper's six attacks x {no defense,
# FT, FP, MCR, NAD}, backdoors trained with the paper's 100-epoch recipe (configs/nad_cifar.py),
# one process per seed sharing the GPU, then each cell's mean ± std over the seeds.
# BASE=backdoorbench runs BackdoorBench's PreAct-ResNet-18 rows instead (configs/backdoorbench.py:
# BadNets, Blend, SIG, WaNet x the same defenses, with BackdoorBench's recipes).
#
#   bash benchmarks/gpu_table.sh prepare                   # here, with a registry: see below
#   bash benchmarks/gpu_table.sh [--config.FIELD=VALUE ...]  # on the GPU machine
#
# Environment (all optional):
#   BASE        the table's base config: 'cifar' (default, configs/nad_cifar.py) or
#               'backdoorbench' (configs/backdoorbench.py)
#   OUT         where the tables, logs and figures are copied (default WORK/out, WORK being
#               runs/gpu_table or runs/gpu_table/backdoorbench)
#   DATA        the CIFAR-10 ImageFolder copy (default ../shared/data/cifar10-jpeg), or
#               'synthetic' for the synthetic data (a check of this script on a CPU)
#   ATTACKS     comma-separated attack variants (default badnets,trojan,blend,cl,sig,refool;
#               with BASE=backdoorbench badnets,blend,sig,wanet)
#   SEEDS       space-separated seeds (default "0 1 2")
#   TIME_LIMIT  seconds each seed's process may run (default 540)
# Checkpoints stay in WORK/seed_S: a rerun continues a run cut short by TIME_LIMIT,
# and once every seed has finished, the gathered table1.{md,csv,json} are written.
# The machine needs jax (with CUDA), flax, optax, orbax-checkpoint, numpy and pillow (and
# matplotlib for the figures). `prepare`, run beforehand where PyPI and the [refool] extra are
# at hand, puts what it may lack under runs/ (carry both folders to it): runs/wheels holds
# ml-collections and absl-py, installed from there where missing; runs/refool_bank holds
# Refool's natural candidate reflections as PNG files (nad_cifar.py:refool's crops of
# scikit-image's photographs, the same pixels), read as attack.pattern_path where
# scikit-image is missing, which table1.json then records.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  pip download -q --no-deps -d runs/wheels ml-collections absl-py || exit 1
  python - <<'EOF' || exit 1
import os
from PIL import Image
from configs import nad_cifar
from nad_jax.attacks import refool
cfg = nad_cifar.get_config('refool').attack
crops = refool.natural_crops(refool.natural_photos(), cfg.reflection_candidates, (32, 32, 3),
                             cfg.seed)
os.makedirs('runs/refool_bank', exist_ok=True)
for i, crop in enumerate(crops.astype('uint8')):
  Image.fromarray(crop).save(f'runs/refool_bank/{i:05d}.png')
print(f'runs/refool_bank: {len(crops)} reflections; runs/wheels:', *os.listdir('runs/wheels'))
EOF
  exit 0
fi
base=${BASE:-cifar}
case "$base" in
  cifar) work=runs/gpu_table; attacks=${ATTACKS:-badnets,trojan,blend,cl,sig,refool} ;;
  backdoorbench) work=runs/gpu_table/backdoorbench; attacks=${ATTACKS:-badnets,blend,sig,wanet} ;;
  *) echo "error: BASE: '$base' is not 'cifar' or 'backdoorbench'" >&2; exit 1 ;;
esac
out=${OUT:-$work/out}
data=${DATA:-../shared/data/cifar10-jpeg}
read -r -a seeds <<< "${SEEDS:-0 1 2}"
limit=${TIME_LIMIT:-540}
mkdir -p "$out" "$work"

if ! python -c 'import ml_collections, absl' 2>/dev/null; then
  pip install -q --no-index --no-deps runs/wheels/*.whl || exit 1
fi
if [ "$data" = synthetic ]; then
  source=(--config.data.source=synthetic)
elif [ -d "$data" ]; then
  source=(--config.data.source=folder "--config.data.path=$data")
else
  echo "error: DATA: no folder $data (the CIFAR-10 ImageFolder copy, or 'synthetic')" >&2
  exit 1
fi
{
  date -u
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} > "$out/machine.txt"
cat "$out/machine.txt"

config="configs/table1.py:$base,$attacks"
if [[ ",$attacks," == *,refool,* ]] && ! python -c 'import skimage' 2>/dev/null; then
  if [ ! -d runs/refool_bank ]; then
    echo 'error: no scikit-image and no runs/refool_bank: run `bash benchmarks/gpu_table.sh prepare` where they can be made' >&2
    exit 1
  fi
  cat > "$work/table1_bank.py" <<'EOF'
"""configs/table1.py with Refool's natural reflections read from runs/refool_bank."""
from configs import table1


def get_config(arg=None):
  config = table1.get_config(arg)
  config.table.attack_configs.refool.attack.pattern_path = 'runs/refool_bank'
  return config
EOF
  config="$work/table1_bank.py:$base,$attacks"
fi
start=$(date +%s)
pids=()
for seed in "${seeds[@]}"; do
  # several processes share the GPU: each allocates what it uses, not 75% of the memory
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$limit" python main.py --config="$config" \
    --config.seed="$seed" --workdir="$work/seed_$seed" "${source[@]}" "$@" \
    > "$out/seed_$seed.log" 2>&1 &
  pids+=($!)
done
finished=true
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    finished=false
    echo "seed ${seeds[$i]}: not finished (see $out/seed_${seeds[$i]}.log); rerun to continue"
  fi
done
echo "seeds ${seeds[*]}: $(( $(date +%s) - start )) s wall" | tee -a "$out/machine.txt"
for seed in "${seeds[@]}"; do
  mkdir -p "$out/seed_$seed"
  cp -r "$work/seed_$seed"/table1.* "$work/seed_$seed"/figures "$out/seed_$seed/" 2>/dev/null
done
if $finished; then
  list=$(IFS=,; echo "${seeds[*]}")
  python main.py --config="$config" --config.seeds="$list" --workdir="$work" "${source[@]}" "$@" \
    > "$out/table.log" 2>&1 || { tail -5 "$out/table.log"; exit 1; }
  cp "$work"/table1.* "$out/"
  cat "$out/table1.md"
else
  exit 3
fi
