"""The speed paths of issue #5, exercised as far as a CPU allows, on the Shakespeare plays (bytes):
`--compile` (torch.compile, Inductor's CPU backend), `--dtype bfloat16` (autocast), the per-device defaults, and
`lm_basics_bench` from its command line (each variant in its own process, the profile, the results files, bad input).

These assert behaviour (the compiled model trains the same numbers as the eager one; a compiled run's checkpoint
resumes without compiling), not speed: the speed figures come from `lm_basics_bench` and are quoted in the README.
"""
import json, subprocess, sys
from pathlib import Path
import pytest, torch


BENCH = Path(sys.executable).parent/'lm_basics_bench'


def losses(lm, d): return [v for _, v in lm.series(lm.read_metrics(Path(d)/'metrics.jsonl'), 'train/loss')]


@pytest.fixture(scope='module')
def eager_and_compiled(tmp_path_factory, corpus, lm):
    d = tmp_path_factory.mktemp('compile')
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    flags = data + lm.tiny_flags(max_iters=20, log_interval=1, eval_interval=10, checkpoint_interval=10, lr=3e-3, min_lr=3e-4)
    eager = lm.run(*flags, '--checkpoint_dir', d/'eager', cwd=d).ok()
    compiled = lm.run(*flags, '--compile', '--checkpoint_dir', d/'compiled', cwd=d, timeout=900).ok()
    return d, eager, compiled, data, lm


@pytest.mark.slow
def test_compiled_model_trains_the_same_numbers(eager_and_compiled):
    d, eager, compiled, _, lm = eager_and_compiled
    assert 'Compiled: no (the default on cpu)' in eager.stdout
    assert 'Compiled: yes' in compiled.stdout and 'default' not in compiled.stdout.split('Compiled: yes')[1].splitlines()[0]
    e, c = losses(lm, d/'eager'), losses(lm, d/'compiled')
    assert len(e) == len(c) == 20
    # the same model, data and seed: Inductor's fused kernels change the rounding, not the training
    for a, b in zip(e, c): assert abs(a - b) < 2e-3 * max(1, abs(a)), (e, c)
    assert c[-1] < c[0] - 0.5
    # the checkpoint holds the plain model's names (no `_orig_mod.` from the compiled wrapper) ...
    ck = lm.load_checkpoint(d/'compiled'/'checkpoint_iter_20.pt')
    assert not [k for k in ck['model_state_dict'] if '_orig_mod' in k or 'module.' in k]
    assert ck['model_state_dict'].keys() == lm.load_checkpoint(d/'eager'/'checkpoint_iter_20.pt')['model_state_dict'].keys()


@pytest.mark.slow
def test_compiled_run_resumes_eager(eager_and_compiled):
    d, _, _, data, lm = eager_and_compiled
    # ... so it resumes without compiling, and ends where the eager run ends
    r = lm.run('--resume_from', d/'compiled'/'checkpoint_iter_10.pt', '--no-compile', '--checkpoint_dir', d/'resumed', cwd=d).ok()
    assert 'Resume: compile: True -> False' in r.stdout and 'Compiled: no' in r.stdout
    a = lm.load_checkpoint(d/'resumed'/'checkpoint_iter_20.pt')['model_state_dict']
    b = lm.load_checkpoint(d/'eager'/'checkpoint_iter_20.pt')['model_state_dict']
    for k in a: torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=2e-2, msg=k)


def test_bfloat16_autocast_trains_on_cpu(tmp_path, corpus, lm):
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    flags = data + lm.tiny_flags(max_iters=20, log_interval=1, lr=3e-3, min_lr=3e-4)
    bf = lm.run(*flags, '--dtype', 'bfloat16', '--checkpoint_dir', tmp_path/'bf16', cwd=tmp_path).ok()
    fp = lm.run(*flags, '--checkpoint_dir', tmp_path/'fp32', cwd=tmp_path).ok()
    assert 'Compute dtype: bfloat16' in bf.stdout and 'Compute dtype: float32' in fp.stdout   # auto is float32 on a CPU
    b, f = losses(lm, tmp_path/'bf16'), losses(lm, tmp_path/'fp32')
    assert b[-1] < b[0] - 0.5
    # bfloat16 keeps 8 bits of mantissa: close to float32, and measurably not identical (autocast really ran)
    assert max(abs(x - y) for x, y in zip(b, f)) < 0.1 and b != f
    # the weights (and the checkpoint) stay float32: autocast changes the compute, not the parameters
    ck = lm.load_checkpoint(tmp_path/'bf16'/'checkpoint_iter_20.pt')
    assert {v.dtype for v in ck['model_state_dict'].values()} == {torch.float32}


def test_float16_on_cpu_is_a_clear_error(tmp_path, corpus, lm):
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    r = lm.run(*data, *lm.tiny_flags(), '--dtype', 'float16', '--checkpoint_dir', tmp_path/'x', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith('error: dtype float16 needs a CUDA device') and 'Traceback' not in r.stderr
    assert not (tmp_path/'x').exists()


# ---------------------------------------------------------------------------------------------------- lm_basics_bench
TINY_BENCH = ['--vocab_size', '512', '--context_length', '64', '--d_model', '64', '--num_layers', '2', '--num_heads', '2',
              '--batch_size', '4', '--steps', '2', '--warmup', '1']

def bench(*args, cwd, timeout=600):
    return subprocess.run([str(BENCH), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_bench_writes_its_table_and_profile(tmp_path):
    p = bench(*TINY_BENCH, '--variants', 'eager:float32,eager:bfloat16', '--profile', '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert 'float32 matmul probe' in p.stdout and f"wrote {tmp_path/'res'}.md" in p.stdout
    res = json.loads((tmp_path/'res.json').read_text())
    rows = res['rows']
    assert [(r['compile'], r['dtype']) for r in rows] == [(False, 'float32'), (False, 'bfloat16')]
    for r in rows:
        assert r['tokens_per_sec'] > 0 and 0 < r['mfu'] < 2 and r['params'] > 0
        # each variant ran in a process of its own: its peak is its own, not the earlier variant's
        assert 100 < r['peak_mem_mb'] < 4000
    assert res['sampling']['batches_per_sec'] > 100
    # the profile: operators by self time, grouped; matmuls are there and their FLOP rate is measured
    assert len(res['profiles']) == 2
    for pr in res['profiles']:
        assert abs(sum(pr['share'].values()) - 1) < 1e-6 and pr['share']['matmul'] > 0 and pr['matmul_flops_per_sec'] > 0
        assert any(o['op'] in ('aten::mm', 'aten::addmm', 'aten::bmm') for o in pr['top'])
    md = (tmp_path/'res.md').read_text()
    assert '| eager float32 |' in md and '| eager bfloat16 |' in md and 'Profile of one eager float32 step' in md
    assert '`aten::mm`' in md or '`aten::addmm`' in md


def test_bench_takes_a_training_config(tmp_path):
    "`--config` benchmarks what lm_basics_train would build from the file; flags given beside it win."
    cfg = Path(__file__).resolve().parents[1]/'configs'/'demo.json'
    p = bench('--config', cfg, '--variants', 'eager:float32', '--steps', '1', '--warmup', '1', '--batch_size', '4',
              '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got, demo = json.loads((tmp_path/'res.json').read_text())['config'], json.loads(cfg.read_text())
    assert {k: got[k] for k in ('vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'device')} == \
           {k: demo[k] for k in ('vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'device')}
    assert got['batch_size'] == 4 and demo['batch_size'] != 4


@pytest.mark.parametrize('args,message', [
    (['--variants', 'fast:float32'], "--variants: 'fast:float32' is not MODE:DTYPE"),
    (['--variants', 'eager:float16'], '--variants: eager:float16 needs a CUDA GPU'),
    (['--d_model', 'wide'], "--d_model: d_model must be int, got 'wide'"),
    (['--device', 'cuda'], 'no CUDA GPU'),
    (['--config', 'missing.json'], 'config file not found: missing.json'),
])
def test_bench_bad_input_is_one_clear_error(tmp_path, args, message):
    if args == ['--device', 'cuda'] and torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    p = bench(*TINY_BENCH, *args, '--out', tmp_path/'res', cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith('error: ') and message in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr + p.stdout and not (tmp_path/'res.md').exists()


def test_gradient_accumulation_is_one_large_batch(tmp_path, corpus, lm):
    # 4 micro-batches of 2 rows and one batch of 8 train on the same rows: the same losses and the same weights
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    flags = data + lm.tiny_flags(max_iters=12, log_interval=1, eval_interval=6, checkpoint_interval=6, lr=3e-3, min_lr=3e-4)
    acc = lm.run(*flags, '--batch_size', '2', '--gradient_accumulation_steps', '4', '--checkpoint_dir', tmp_path/'acc', cwd=tmp_path).ok()
    lm.run(*flags, '--batch_size', '8', '--checkpoint_dir', tmp_path/'big', cwd=tmp_path).ok()
    assert 'Tokens per iteration: 256' in acc.stdout   # 2 rows x 32 tokens x 4 micro-steps
    a, b = losses(lm, tmp_path/'acc'), losses(lm, tmp_path/'big')
    assert len(a) == len(b) == 12 and a[-1] < a[0] - 0.5
    for x, y in zip(a, b): assert abs(x - y) < 1e-4, (a, b)
    wa = lm.load_checkpoint(tmp_path/'acc'/'checkpoint_iter_12.pt')['model_state_dict']
    wb = lm.load_checkpoint(tmp_path/'big'/'checkpoint_iter_12.pt')['model_state_dict']
    for k in wa: torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)
    # --total_batch_size (tokens per step) picks the accumulation itself: 256 tokens = 4 micro-steps of 2 rows x 32 tokens
    tot = lm.run(*flags, '--batch_size', '2', '--total_batch_size', '256', '--checkpoint_dir', tmp_path/'tot', cwd=tmp_path).ok()
    assert 'gradient_accumulation_steps 1 -> 4' in tot.stdout and 'Tokens per iteration: 256' in tot.stdout
    assert losses(lm, tmp_path/'tot') == a
    bad = lm.run(*flags, '--batch_size', '3', '--total_batch_size', '256', '--checkpoint_dir', tmp_path/'bad', cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith('error: total_batch_size 256 tokens is not a multiple') and 'use --batch_size 2' in bad.stderr
    assert 'Traceback' not in bad.stderr and not (tmp_path/'bad').exists()
    # and a run resumed mid-way continues the same stream of rows
    lm.run('--resume_from', tmp_path/'acc'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'res', cwd=tmp_path).ok()
    wr = lm.load_checkpoint(tmp_path/'res'/'checkpoint_iter_12.pt')['model_state_dict']
    for k in wa: torch.testing.assert_close(wr[k], wa[k], atol=0, rtol=0, msg=k)
