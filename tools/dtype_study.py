"""Does bfloat16 autocast on a CPU trade learning for speed? Validation loss at equal tokens and at equal wall-clock.

Trains the same run in float32 and in bfloat16 autocast, for several seeds, and writes every run's evaluations (with
the seconds trained at each) to a JSON file; `summarise` turns it into the tables of the runtime chapter.

    python tools/dtype_study.py --out nbs/dtype_study.json                  # the demo config and the bench shapes
    python tools/dtype_study.py --out /tmp/s.json --setups demo --iters 100 --seeds 0   # a quick look

Setups: `demo` is configs/demo.json (the Shakespeare bytes) cut to `--iters` iterations (its schedule cut with it);
`bench` is `lm_basics_bench`'s default shapes (4 layers of 256, context 256, batch 16) on the Shakespeare plays
tokenized with a 10,000-token BPE by `lm_basics_prepare`. Every run is float32 weights and optimizer state; only the
forward and backward pass differ.
"""
from __future__ import annotations
import argparse, contextlib, dataclasses, io, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def setups(iters:int, work:Path) -> dict:
    from lm_basics.config import load_config_file
    demo = {k: v for k, v in load_config_file(ROOT/'configs'/'demo.json').items() if k not in ('checkpoint_dir', 'resume_from')}
    demo.update(max_iters=iters, warmup_iters=max(1, iters // 10), eval_interval=max(1, iters // 4), log_interval=iters,
                checkpoint_interval=iters, sample_tokens=0, plot=False, compile=False)
    data = work/'bpe10k'
    if not (data/'train.npy').exists():
        from lm_basics.data import shakespeare_plays
        plays = work/'plays'; plays.mkdir(parents=True, exist_ok=True)
        for n, t in shakespeare_plays().items(): (plays/f'{n}.txt').write_text(t)
        subprocess.run([str(Path(sys.executable).parent/'lm_basics_prepare'), str(plays), '--out', str(data),
                        '--vocab_size', '10000', '--no-progress'], check=True, stdout=subprocess.DEVNULL)
    bench = dict(train_data_path=str(data/'train.npy'), val_data_path=str(data/'val.npy'), vocab_size=10000, context_length=256,
                 d_model=256, num_layers=4, num_heads=4, batch_size=16, max_iters=iters, warmup_iters=max(1, iters // 10),
                 eval_interval=max(1, iters // 4), eval_iters=10, log_interval=iters, checkpoint_interval=iters, plot=False,
                 compile=False, device='cpu')
    return dict(demo=demo, bench=bench)

def run(settings:dict, dtype:str, seed:int, work:Path) -> dict:
    "One run; its evaluations as (iteration, seconds trained, val loss), and its final train and val loss."
    from lm_basics.config import TrainConfig
    from lm_basics.train import train
    from lm_basics.records import read_metrics
    d = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(TrainConfig(**settings, dtype=dtype, seed=seed, checkpoint_dir=str(d)))
    evals = [(r['iter'], r['time'], r['eval/val_loss']) for r in read_metrics(d) if 'eval/val_loss' in r]
    return dict(dtype=dtype, seed=seed, seconds=time.perf_counter() - t0, evals=evals,
                train_loss=res['final/train_loss'], val_loss=res['final/val_loss'])

def loss_at(evals:list, seconds:float) -> float:
    "A run's validation loss after `seconds` of training, interpolated between its evaluations."
    for (i0, t0, v0), (i1, t1, v1) in zip(evals, evals[1:]):
        if t0 <= seconds <= t1: return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return evals[-1][2] if seconds > evals[-1][1] else evals[0][2]

def summarise(results:dict) -> str:
    "Markdown tables: the loss at equal tokens (mean ± std over seeds), and at the wall-clock the faster run needed."
    out = []
    for setup, runs in results.items():
        by = {d: [r for r in runs if r['dtype'] == d] for d in ('float32', 'bfloat16')}
        if not all(by.values()): continue
        ms = lambda xs: f"{statistics.fmean(xs):.4f} ± {statistics.pstdev(xs):.4f}"
        f, b = by['float32'], by['bfloat16']
        secs = {d: statistics.fmean(r['seconds'] for r in rs) for d, rs in by.items()}
        fast, slow = ('bfloat16', 'float32') if secs['bfloat16'] < secs['float32'] else ('float32', 'bfloat16')
        at = statistics.fmean(r['seconds'] for r in by[fast])
        equal_clock = [loss_at(r['evals'], min(at, r['evals'][-1][1])) for r in by[slow]]
        gap = statistics.fmean(r['val_loss'] for r in b) - statistics.fmean(r['val_loss'] for r in f)
        out.append(f"**{setup}** ({len(f)} seeds, {f[0]['evals'][-1][0]} iterations)\n\n"
                   f"| | float32 | bfloat16 |\n|---|---:|---:|\n"
                   f"| val loss at equal tokens | {ms([r['val_loss'] for r in f])} | {ms([r['val_loss'] for r in b])} |\n"
                   f"| train loss at equal tokens | {ms([r['train_loss'] for r in f])} | {ms([r['train_loss'] for r in b])} |\n"
                   f"| seconds per run | {secs['float32']:,.0f} | {secs['bfloat16']:,.0f} |\n\n"
                   f"bfloat16 - float32 at equal tokens: {gap:+.4f} nats. At the {at:,.0f} s the {fast} runs took, the {slow} runs "
                   f"had reached a val loss of {statistics.fmean(equal_clock):.4f} (against {statistics.fmean(r['val_loss'] for r in by[fast]):.4f}).\n")
    return '\n'.join(out)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='dtype_study.json'); p.add_argument('--iters', type=int, default=300)
    p.add_argument('--seeds', default='0,1,2'); p.add_argument('--setups', default='demo,bench')
    p.add_argument('--work', default=None, help='a directory for the data and the runs (default: a temporary one)')
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix='dtype_study_')); work.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    all_setups = setups(a.iters, work)
    for setup in a.setups.split(','):
        for seed in map(int, a.seeds.split(',')):
            for dtype in ('float32', 'bfloat16'):   # side by side, seed by seed: a busy machine slows both alike
                if any(r['seed'] == seed and r['dtype'] == dtype for r in results.get(setup, [])): continue
                r = run(all_setups[setup], dtype, seed, work)
                results.setdefault(setup, []).append(r)
                Path(a.out).write_text(json.dumps(results, indent=1))
                print(f"{setup} seed {seed} {dtype}: val {r['val_loss']:.4f} in {r['seconds']:.0f} s", flush=True)
    print(summarise(results))
