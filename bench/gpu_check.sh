#!/usr/bin/env bash
# One-shot GPU check for issue 4 (KTO training throughput against TRL), prepared on a CPU machine.
#
# On the device machine, from the repo root, with the wheels carried (see docs/benchmarks.md):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=520)
# (or "bash bench/gpu_check.sh --targets", timeout_s=370: the CUDA-graph and LM-head tests, then fixed-b32
# with TRL, Prospect's defaults and Prospect recomputing its LM head's logits interleaved twice, then
# varlen-b32, then the b8 ones while time is left, in 330 s)
# It installs nothing from the network: trl, datasets, dill, multiprocess and liger-kernel come
# from .whl/ (pip --no-index --no-deps --target, the matching multiprocess build only). Then:
#   1. the CUDA tests (pytest -m gpu tests/kto/test_gpu.py): CUDA-graph replay against the eager
#      trajectory, packed vs padded in bf16 and float32, short training runs, the attention backends;
#   2. bench/train_throughput.py for fixed-b32 (TRL, Prospect's defaults, which replay every step
#      from a CUDA graph there, and Prospect without graphs, interleaved twice) and varlen-b32 (TRL,
#      Prospect's defaults, eager there, and without graphs), each in its own process, against
#      TRL's best on the same GPU;
#   3. bench/step_phases.py: a step's device time by phase beside the host's time issuing it, the
#      host syncs inside a step, the backbone and the LM head apart;
#   4. Prospect without each of its tricks (no Liger, no shared prompt, no kept LM-head gradient, eager or
#      autograd LM head);
#   5. varlen-b8 and fixed-b8 while time is left.
# Everything lands in $OUT (env.txt, pytest_gpu.txt, bench.json, bench_varlen.json, bench_log.txt,
# phases.txt, and while time is left variants.json, variants_log.txt, b8.json), and last verdict.txt
# (bench/verdict.py: whether each target is met, parity, the CUDA tests). BUDGET_S (default 470)
# bounds the whole script, so that the run stays inside one 10-minute command with room to spare.
#
# .whl/ is git-ignored, so a fresh checkout lacks it: fetch the wheels first, HERE (not on the
# device machine, which reaches no registry):   bash bench/gpu_check.sh --fetch-wheels
set -u
if [ "${1:-}" = "--fetch-wheels" ]; then
  # pure-Python wheels, plus multiprocess's per-CPython builds (the image's Python is 3.12 as last
  # seen; 3.11 and 3.13 in case it changed). About 3 MiB in all; the carry limit is 64 MiB.
  mkdir -p .whl
  PIPDL="${PY:-python3} -m pip download -q --no-deps --only-binary=:all: --implementation cp --platform manylinux2014_x86_64 -d .whl"
  for v in 3.12 3.11 3.13; do $PIPDL --python-version "$v" multiprocess==0.70.19 || exit 1; done
  $PIPDL --python-version 3.12 trl==1.16.0 datasets==5.2.0 dill==0.4.1 liger-kernel==0.8.5 || exit 1
  ls -la .whl; exit 0
fi
# --targets: the CUDA-graph tests and the two targets only (a second, shorter run in one session)
QUICK=0; [ "${1:-}" = "--targets" ] && QUICK=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-$([ $QUICK = 1 ] && echo 330 || echo 470)}
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
PY=${PY:-python3}
SIZE=${BENCH_SIZE:-0.5b}       # BENCH_SIZE=tiny BENCH_EXTRA="--device cpu" rehearses the script on a CPU
EXTRA=${BENCH_EXTRA:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONDONTWRITEBYTECODE=1

{
  echo "== $(date -u +%FT%TZ)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -V
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|triton|pyarrow|fsspec|huggingface[-_]hub|xxhash|pandas|numpy|safetensors|tokenizers|requests|aiohttp|psutil|trl|datasets|dill|multiprocess|liger[-_]kernel) ' || true
} >"$OUT/env.txt" 2>&1

# ---- 1. carried wheels (pure Python; multiprocess has one build per CPython minor version)
SITE=/tmp/prospect-site
PYTAG=$($PY -c 'import sys; print(f"py3{sys.version_info.minor}")')
WHEELS=()
for w in .whl/*.whl; do
  [ -e "$w" ] || continue
  case "$(basename "$w")" in
    multiprocess-*-py3[0-9]*-none-any.whl) [[ "$(basename "$w")" == *"-$PYTAG-"* ]] && WHEELS+=("$w") ;;
    *) WHEELS+=("$w") ;;
  esac
done
if [ ${#WHEELS[@]} -eq 0 ]; then
  echo "== NO WHEELS in .whl/: the TRL side cannot run (on the CPU machine: bash bench/gpu_check.sh --fetch-wheels," \
       "then carry [\".whl\"])" | tee -a "$OUT/env.txt"
else
  echo "== installing ${WHEELS[*]}" >>"$OUT/env.txt"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}" \
    >>"$OUT/env.txt" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "triton", "datasets", "trl", "liger_kernel.transformers"):
    try:
        m = importlib.import_module(name)
        print(f"import {name}: ok {getattr(m, '__version__', '')}")
    except Exception as e:
        print(f"import {name}: FAILED {e!r}")
try:
    from trl import KTOTrainer  # noqa: F401  (the trainer's own import chain)
    print("import trl.KTOTrainer: ok")
except Exception as e:
    print(f"import trl.KTOTrainer: FAILED {e!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("varlen_attn: present")
except Exception as e:
    print(f"varlen_attn: missing {e!r}")
EOF
cat "$OUT/env.txt"

# ---- 2. the CUDA tests first, the CUDA-graph ones before the rest (replay against the eager trajectory, fixed
#         and bucketed lengths); then packed vs padded in bf16 and float32, short runs, the attention backends
B=$(( $(left) - $([ $QUICK = 1 ] && echo 260 || echo 370) )); [ "$B" -gt 70 ] && B=70
SEL=cuda_graph; [ $QUICK = 1 ] && SEL="cuda_graph or fused_lm_head"
echo "== pytest -m gpu -k '$SEL' ($B s for it)"
if [ "$B" -gt 30 ]; then
  timeout "$B" $PY -m pytest -q -m gpu tests/kto/test_gpu.py -k "$SEL" -p no:cacheprovider -o addopts="" \
    -o timeout=60 -rA 2>&1 | tee "$OUT/pytest_gpu.txt" | grep -E "PASS|FAIL|ERROR|passed|failed|bucketed|liger=|relative errors" | tail -20
fi
B=$(( $(left) - 320 )); [ "$B" -gt 60 ] && B=60; [ $QUICK = 1 ] && B=0
echo "== pytest -m gpu, the rest ($B s for it)"
if [ "$B" -gt 30 ]; then
  timeout "$B" $PY -m pytest -q -m gpu tests/kto/test_gpu.py -k "not cuda_graph" -p no:cacheprovider -o addopts="" \
    -o timeout=60 -rA 2>&1 | tee -a "$OUT/pytest_gpu.txt" | grep -E "PASS|FAIL|ERROR|passed|failed|relative errors|backend" \
    | tail -20
fi

# ---- 3. the targets, Prospect against TRL's best in one process on one GPU, each configuration in a process
#         of its own (a CUDA-graph capture gone wrong costs only its section):
#         fixed-b32: TRL, Prospect's defaults (every step replayed from one CUDA graph), Prospect without
#         graphs, interleaved twice (A B C A B C), 12 timed steps each, pooled (runs were seen to differ by
#         15-20%); varlen-b32: TRL, Prospect's defaults (no shape repeats, so no graph), Prospect without
#         graphs; 20 timed steps
B=$(( $(left) - $([ $QUICK = 1 ] && echo 100 || echo 150) ))
# --targets: TRL, Prospect's defaults and Prospect recomputing the LM head's logits in its backward (the
# default before the kept gradient), twice each; no eager side
FIXED_SIDES=trl,prospect,prospect-eager FIXED_REPEATS=2 VARLEN_SIDES=trl,prospect,prospect-eager
[ $QUICK = 1 ] && FIXED_SIDES=trl,prospect,prospect-recompute VARLEN_SIDES=trl,prospect
echo "== bench fixed-b32 ($B s for it)"
if [ "$B" -gt 60 ]; then
  timeout "$B" $PY bench/train_throughput.py --size "$SIZE" $EXTRA --configs fixed-b32 \
    --sides "$FIXED_SIDES" --repeats "$FIXED_REPEATS" --steps 12 --json-out "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench_log.txt" | grep -vE 'Warning|warn\(|it/s\]|examples/s\]' | tail -14
fi
B=$(( $(left) - $([ $QUICK = 1 ] && echo 5 || echo 45) ))
echo "== bench varlen-b32 ($B s for it)"
if [ "$B" -gt 60 ]; then
  timeout "$B" $PY bench/train_throughput.py --size "$SIZE" $EXTRA --configs varlen-b32 \
    --sides "$VARLEN_SIDES" --steps 20 --json-out "$OUT/bench_varlen.json" 2>&1 \
    | tee -a "$OUT/bench_log.txt" | grep -vE 'Warning|warn\(|it/s\]|examples/s\]' | tail -14
fi

# ---- 3b. where a step's device time goes (CUDA events; torch.profiler recorded nothing on these machines)
#      fixed-b32 first (the harder target), varlen-b32 while at least a minute is left
for c in fixed-b32 varlen-b32; do
  [ $QUICK = 1 ] && break
  B=$(( $(left) - 10 ))
  if [ "$B" -gt 40 ] && { [ "$c" = fixed-b32 ] || [ "$B" -gt 60 ]; }; then
    echo "== step phases $c ($B s: device and host time per phase, the syncs inside a step)"
    timeout "$B" $PY bench/step_phases.py --size "$SIZE" $EXTRA --config "$c" 2>&1 | grep -vE 'Warning|warn\(' \
      | tee -a "$OUT/phases.txt" | tail -22
  fi
done

# ---- 4. where the speed comes from: Prospect without each of its tricks, in one process
B=$(( $(left) - 60 )); [ $QUICK = 1 ] && B=0
if [ "$B" -gt 60 ]; then
  echo "== variants ($B s for them)"
  timeout "$B" $PY bench/train_throughput.py --size "$SIZE" $EXTRA --configs varlen-b32,fixed-b32 \
    --sides prospect-noliger,prospect,prospect-noshare,prospect-recompute,prospect-eagerhead,prospect-ckpthead,prospect-chunk4k \
    --json-out "$OUT/variants.json" 2>&1 | tee "$OUT/variants_log.txt" | grep -vE 'Warning|warn\(' | tail -12
fi

# ---- 5. the b8 configurations while time is left (with --targets too): the host sets their pace, so
#         Prospect's defaults (CUDA graphs at fixed-b8) against Prospect without graphs
B=$(( $(left) - 5 ))
if [ "$B" -gt 50 ]; then
  echo "== bench b8 ($B s for them)"
  timeout "$B" $PY bench/train_throughput.py --size "$SIZE" $EXTRA --configs varlen-b8,fixed-b8 --sides trl,prospect,prospect-eager \
    --deadline-s $((B - 40)) --json-out "$OUT/b8.json" 2>&1 | tee -a "$OUT/bench_log.txt" \
    | grep -vE 'Warning|warn\(|it/s\]|examples/s\]' | tail -12
fi
# ---- 6. the verdict: each target, parity, the CUDA tests, the kept LM-head gradient against recomputing
echo "== verdict"
$PY bench/verdict.py "$OUT" 2>&1 | tee "$OUT/verdict.txt"
echo "== done in $(( $(date +%s) - T0 )) s; files in $OUT:"; ls -la "$OUT"
