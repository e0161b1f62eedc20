#!/usr/bin/env bash
# Check lm_basics on one CUDA GPU in under five minutes, on a machine with its own PyTorch and no network:
#   setup     install lm_basics (editable) into a virtual environment that sees the machine's PyTorch; what else is
#             missing comes from the wheels that tools/gpu_wheels.sh downloaded beside the tree (shared/wheels)
#   tests     the tests of the CUDA paths: tests/test_speed_paths.py -k test_cuda_ (bfloat16 autocast, float16 with the
#             gradient scaler, fused AdamW, pinned batches, compile, the GPU peak table, the benchmark, NCCL DDP on 2+ GPUs)
#   data      synthetic token files for configs/gpt2_124M.json (its own data paths do not exist there)
#   train_*   300 steps of configs/gpt2_124M.json in bfloat16, eager and compiled (one micro-batch per step)
#   bench     lm_basics_bench on the GPU: lm_basics beside the plain reference step, eager and compiled
# and write OUT/gpu_check.json, OUT/gpu_check.md (GPU, tokens/s and MFU against the GPU's bfloat16 peak, compiled
# against eager, the tests) and OUT/gpu_check.log (every step's output). Every step has a time limit and the whole
# run a budget (290 s: the steps' caps add up to 280 s, 10 s are kept for the summary); a step that fails or runs out
# of time makes the script print GPU CHECK FAILED and exit 1, after writing the results it has.
#
#   tools/gpu_check.sh [--out DIR] [--wheels DIR] [--work DIR] [--budget SECONDS] [--no-install] [--cpu]
#
# --out        where the three result files go (default: gpu_check_results)
# --wheels     the wheels folder (default: shared/wheels)
# --work       scratch: the virtual environment, token files, checkpoints (default: /tmp/lm_basics_gpu_check)
# --budget     seconds for the whole run (default: 290)
# --no-install use the Python on PATH as it is (lm_basics and its requirements already installed)
# --cpu        the same steps on the CPU at toy sizes: a check of this script where there is no GPU
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=gpu_check_results WHEELS=shared/wheels WORK=/tmp/lm_basics_gpu_check BUDGET=290 INSTALL=1 CPU=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2;;
    --wheels) WHEELS=$2; shift 2;;
    --work) WORK=$2; shift 2;;
    --budget) BUDGET=$2; shift 2;;
    --no-install) INSTALL=0; shift;;
    --cpu) CPU=1; shift;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "error: unknown argument $1; see $0 --help" >&2; exit 2;;
  esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "error: --budget must be a whole number of seconds, got $BUDGET" >&2; exit 2; }
mkdir -p "$OUT" "$WORK/logs" || { echo "error: cannot create $OUT or $WORK" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
case $WHEELS in /*) ;; *) WHEELS=$ROOT/$WHEELS;; esac
START=$(date +%s) DEADLINE=$(( $(date +%s) + BUDGET ))
STEPS=$WORK/steps.tsv; : > "$STEPS"; rm -f "$WORK"/logs/*.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MPLBACKEND=Agg LM_BASICS_CACHE=$WORK/cache PIP_DISABLE_PIP_VERSION_CHECK=1

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less if the budget ends sooner), its output in logs/NAME.log
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 10 ))   # 10 s kept for the summary
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    printf '%s\tskipped\t0\t%s\n' "$name" "out of time (budget ${BUDGET}s)" >> "$STEPS"
    echo "== $name: SKIPPED, out of time"; return 1
  fi
  echo "== $name (at most ${limit}s)"
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok why=
  if (( rc == 124 || rc == 137 )); then status=timeout why="stopped at its limit of ${limit}s"
  elif (( rc != 0 )); then status=failed why="exit status $rc: $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-300)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$why" >> "$STEPS"
  echo "   $status in ${dt}s${why:+: $why}"
  [[ $status == ok ]]
}

# ---------------------------------------------------------------------------------------------------- setup
if [[ $CPU == 0 ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || {
    echo "GPU CHECK FAILED: $PY cannot use a CUDA GPU (torch.cuda.is_available() is false or torch is missing); use --cpu to check the script itself" >&2
    exit 1; }
fi

setup() {   # a venv that sees this Python's packages (torch among them), lm_basics installed into it from the tree
  set -e
  rm -rf "$WORK/venv"
  "$PY" -m venv "$WORK/venv"
  local outer mine
  outer=$("$PY" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))')
  mine=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "$outer" > "$mine/_outer_site.pth"   # after the venv's own site-packages: what pip installs here wins
  local find=() reqs; [[ -d $WHEELS ]] && find=(--find-links "$WHEELS")
  # lm_basics itself without its requirements (pip would otherwise re-check torch's own, which this machine's torch decides),
  # then the requirements of settings.ini but torch, from what is installed or the wheels
  "$WORK/venv/bin/python" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT"
  reqs=$("$WORK/venv/bin/python" -c 'import configparser, re; c = configparser.ConfigParser(delimiters=["="]); c.read("settings.ini")
print(" ".join(r for r in c["DEFAULT"]["requirements"].split() if re.match(r"[A-Za-z0-9_.-]+", r)[0].lower() != "torch"))')
  "$WORK/venv/bin/python" -m pip install --no-index "${find[@]}" $reqs "pytest>=8" ||
    { echo "pip could not install the requirements offline: run tools/gpu_wheels.sh (with network) and carry $WHEELS with the tree"; return 1; }
  "$WORK/venv/bin/python" -c 'import torch, lm_basics; print("torch", torch.__version__, "from", torch.__file__, "| lm_basics", lm_basics.__version__)'
}
if [[ $INSTALL == 1 ]]; then
  step setup 40 bash -c "$(declare -f setup); PY='$PY' WORK='$WORK' WHEELS='$WHEELS' ROOT='$ROOT' setup" && BIN=$WORK/venv/bin || BIN=
else
  BIN=$(dirname "$(command -v lm_basics_train || echo /nonexistent/x)")
  [[ -x $BIN/lm_basics_train ]] || BIN=
  printf 'setup\t%s\t0\t%s\n' "$([[ -n $BIN ]] && echo ok || echo failed)" "--no-install: lm_basics_train ${BIN:+in $BIN}${BIN:-is not on PATH}" >> "$STEPS"
fi

# ---------------------------------------------------------------------------------------------------- the rest
if [[ -n $BIN ]]; then
  export PATH=$BIN:$PATH
  PYX=$BIN/python; [[ -x $PYX ]] || PYX=$PY

  step tests 50 "$PYX" -m pytest "$ROOT/tests/test_speed_paths.py" -k test_cuda_ -v -rs -p no:cacheprovider --junitxml="$WORK/tests.xml"

  DATA=$WORK/data
  if [[ $CPU == 1 ]]; then   # toy sizes: the script's logic, in a minute or two
    SIZE=(--vocab_size 512 --context_length 64 --d_model 64 --num_layers 2 --num_heads 2 --d_ff 172 --batch_size 4 --device cpu)
    ITERS=20 BENCH=(--vocab_size 512 --context_length 64 --d_model 64 --num_layers 2 --num_heads 2 --batch_size 4 --device cpu --steps 2 --warmup 1)
    VOCAB=512
  else
    SIZE=(--device cuda) ITERS=300 VOCAB=50304
    BENCH=(--config "$ROOT/configs/gpt2_124M.json" --device cuda --steps 5 --warmup 2)
  fi
  step data 10 "$PYX" - "$DATA" "$VOCAB" <<'EOF'
import sys, numpy as np
from pathlib import Path
d, vocab = Path(sys.argv[1]), int(sys.argv[2])
d.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (('train', 4_000_000), ('val', 400_000)):
    np.save(d/f'{split}.npy', rng.integers(0, vocab, n, dtype=np.uint16))
print(f"synthetic uint16 token files in {d}: 4,000,000 and 400,000 ids below {vocab}")
EOF
  TRAIN=(--config "$ROOT/configs/gpt2_124M.json" --train_data_path "$DATA/train.npy" --val_data_path "$DATA/val.npy"
         --dtype bfloat16 --max_iters "$ITERS" --gradient_accumulation_steps 1 --warmup_iters 20 --log_interval 10
         --eval_interval "$ITERS" --eval_iters 5 --checkpoint_interval "$ITERS" --keep_last 1 --no-plot "${SIZE[@]}")
  rm -rf "$WORK/runs"
  step train_eager 40 "$BIN/lm_basics_train" "${TRAIN[@]}" --no-compile --checkpoint_dir "$WORK/runs/eager"
  step train_compiled 65 "$BIN/lm_basics_train" "${TRAIN[@]}" --compile --checkpoint_dir "$WORK/runs/compiled"
  VARIANTS=eager:bfloat16,compiled:bfloat16; [[ $CPU == 1 ]] && VARIANTS=eager:float32
  step bench 75 "$BIN/lm_basics_bench" "${BENCH[@]}" --baseline --rounds 1 --variants "$VARIANTS" --out "$WORK/bench"
else
  PYX=$PY
fi

# ---------------------------------------------------------------------------------------------------- results
"$PYX" - "$WORK" "$OUT" "$CPU" "$(( $(date +%s) - START ))" "$BUDGET" <<'EOF'
import json, platform, statistics, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, out, cpu, elapsed, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4]), int(sys.argv[5])
steps = [dict(zip(('step', 'status', 'seconds', 'why'), l.split('\t'))) for l in (work/'steps.tsv').read_text().splitlines() if l]
for s in steps: s['seconds'] = int(s['seconds'])
res = dict(mode='cpu (a check of the script)' if cpu else 'gpu', elapsed_s=elapsed, budget_s=budget, steps=steps, python=platform.python_version())
problems = [f"{s['step']}: {s['status']} ({s['why']})" for s in steps if s['status'] != 'ok']
try:
    import torch
    res['torch'], res['cuda'] = torch.__version__, torch.version.cuda
    dev = torch.device('cpu' if cpu else 'cuda')
    res['device'] = torch.cuda.get_device_name(0) if dev.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"
    res['gpus'] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        from lm_basics.runtime import peak_flops
        peak, src = peak_flops(dev, 'bfloat16')
    except Exception as e: peak, src = 0.0, f"peak_flops failed: {e}"
    res['bfloat16_peak_flops'], res['peak_source'] = peak, src
except Exception as e:
    problems.append(f"cannot import torch for the summary: {e}"); peak = 0.0

xml = work/'tests.xml'
if xml.exists():   # pytest's own record: every CUDA test by name, and what became of it
    tests = []
    for tc in ET.parse(xml).getroot().iter('testcase'):
        kids = {c.tag: c for c in tc}
        st = 'failed' if 'failure' in kids or 'error' in kids else 'skipped' if 'skipped' in kids else 'passed'
        why = (kids.get('skipped') if st == 'skipped' else kids.get('failure', kids.get('error')))
        tests.append(dict(name=tc.get('name'), status=st, seconds=float(tc.get('time', 0)), why=(why.get('message', '') if why is not None else '')[:300]))
    res['tests'] = tests
    counts = {k: sum(t['status'] == k for t in tests) for k in ('passed', 'failed', 'skipped')}
    res['test_counts'] = counts
    if not cpu and not counts['passed']: problems.append("tests: no CUDA test passed")
    if cpu and counts['passed']: problems.append("tests: a CUDA test passed without a GPU (it should have skipped)")

def run_summary(name, compiled):
    d = work/'runs'/name
    log = (work/'logs'/f'train_{name}.log')
    if not (d/'metrics.jsonl').exists(): return None
    recs = [json.loads(l) for l in (d/'metrics.jsonl').read_text().splitlines() if l.strip()]
    rows = [r for r in recs if 'train/tokens_per_sec' in r]
    steady = [r for r in rows if r['iter'] >= max(r['iter'] for r in rows) // 3] or rows   # after compilation and warm-up
    tps = statistics.median(r['train/tokens_per_sec'] for r in steady)
    cfg = json.loads((d/'config.json').read_text())
    from lm_basics.model import TransformerLM, MODEL_ARGS, count_parameters, flops_per_token
    with torch.device('meta'): m = TransformerLM(**{k: cfg[k] for k in MODEL_ARGS})
    fpt = flops_per_token(m.config, count_parameters(m)['non_embedding'])
    text = log.read_text() if log.exists() else ''
    trainer_mfu = statistics.median(r['train/mfu'] for r in steady) if all('train/mfu' in r for r in steady) else None
    # the trainer's own MFU (its peak raised to any rate a step reached, so never above 100%); recomputed only if it logged none
    s = dict(iterations=max(r['iter'] for r in rows) + 1, tokens_per_sec=tps,
             mfu=trainer_mfu if trainer_mfu is not None else (min(1.0, tps * fpt / peak) if peak else None),
             flops_per_token=fpt, first_loss=rows[0]['train/loss'], last_loss=rows[-1]['train/loss'],
             compiled='Compiled: yes' in text, bfloat16='Compute dtype: bfloat16' in text, trainer_mfu=trainer_mfu)
    if s['mfu'] is not None and s['mfu'] > 1.0: problems.append(f"train_{name}: MFU {s['mfu']:.1%} above 100%")
    if s['compiled'] != compiled or not s['bfloat16']: problems.append(f"train_{name}: the log does not say compiled={compiled} in bfloat16")
    return s
try:
    res['training'] = {k: v for k, c in (('eager', False), ('compiled', True)) if (v := run_summary(k, c))}
    tr = res['training']
    if 'eager' in tr and 'compiled' in tr: res['compiled_over_eager'] = tr['compiled']['tokens_per_sec'] / tr['eager']['tokens_per_sec']
except Exception as e: problems.append(f"summary of the training runs failed: {type(e).__name__}: {e}")
if (work/'bench.json').exists():
    b = json.loads((work/'bench.json').read_text())
    res['bench'] = dict(command=b.get('command'), rows=[{k: r.get(k) for k in ('model', 'compile', 'dtype', 'tokens_per_sec', 'mfu', 'peak_flops', 'peak_mem_mb')} for r in b['rows']],
                        side_by_side=b.get('side_by_side'), against_reference_eager=b.get('against_reference_eager'))
res['ok'], res['problems'] = not problems, problems
(out/'gpu_check.json').write_text(json.dumps(res, indent=2))

pct = lambda x: f"{x * 100:.1f}%" if x is not None else 'n/a'
rate = lambda x: f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"
md = [f"# lm_basics GPU check: {'PASSED' if res['ok'] else 'FAILED'}", '',
      f"{res.get('device', '?')} ({res.get('gpus', 0)} GPU(s)), torch {res.get('torch')}, CUDA {res.get('cuda')}, Python {res['python']}; "
      f"bfloat16 peak {rate(res.get('bfloat16_peak_flops', 0))} ({res.get('peak_source')}); {elapsed} s of a {budget} s budget.", '',
      '| step | status | seconds | note |', '|---|---|---:|---|'] + [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['why']} |" for s in steps]
if 'training' in res and res['training']:
    md += ['', 'Training (configs/gpt2_124M.json in bfloat16, one micro-batch per step, synthetic tokens; median after the first third of the steps):', '',
           '| run | steps | tokens/s | MFU (bf16 peak) | first loss | last loss |', '|---|---:|---:|---:|---:|---:|']
    md += [f"| {k} | {v['iterations']} | {v['tokens_per_sec']:,.0f} | {pct(v['mfu'])} | {v['first_loss']:.3f} | {v['last_loss']:.3f} |" for k, v in res['training'].items()]
    if 'compiled_over_eager' in res: md += ['', f"Compiled / eager: {res['compiled_over_eager']:.2f}x"]
if 'bench' in res:
    md += ['', f"Benchmark: `{res['bench']['command']}`", '', '| model | variant | tokens/s | MFU |', '|---|---|---:|---:|']
    md += [f"| {r['model']} | {'compiled' if r['compile'] else 'eager'} {r['dtype']} | {r['tokens_per_sec']:,.0f} | {pct(r['mfu'])} |" for r in res['bench']['rows']]
    md += [f"\nlm_basics / reference, {s['variant']}: {s['ratio']:.2f}x" for s in res['bench']['side_by_side'] or []]
if 'tests' in res:
    c = res['test_counts']
    md += ['', f"Tests (tests/test_speed_paths.py -k test_cuda_): {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped", '',
           '| test | result | seconds | note |', '|---|---|---:|---|'] + [f"| {t['name']} | {t['status']} | {t['seconds']:.1f} | {t['why']} |" for t in res['tests']]
if problems: md += ['', '**Problems:**', ''] + [f"- {p}" for p in problems]
(out/'gpu_check.md').write_text('\n'.join(md) + '\n')
print('\n'.join(md))
sys.exit(0 if res['ok'] else 1)
EOF
rc=$?
{ for f in "$WORK"/logs/*.log; do [[ -e $f ]] && { echo "==================== $(basename "$f" .log)"; cat "$f"; }; done; } > "$OUT/gpu_check.log"
if (( rc != 0 )); then
  echo "GPU CHECK FAILED: see $OUT/gpu_check.md and $OUT/gpu_check.log" >&2; exit 1
fi
echo "GPU check passed in $(( $(date +%s) - START ))s: $OUT/gpu_check.md, $OUT/gpu_check.json, $OUT/gpu_check.log"
