"""The speed paths, exercised as far as a CPU allows, on the Shakespeare plays (bytes):
`--compile` (torch.compile, Inductor's CPU backend), `--dtype bfloat16` (autocast), the per-device defaults, and
`lm_basics_bench` from its command line (each variant in its own process, the profile, the results files, bad input,
the reference step beside lm_basics' own). The `test_cuda_*` tests exercise the GPU paths (bfloat16 and float16 autocast,
the gradient scaler, fused AdamW, pinned batches, compile, the peak table, NCCL DDP) and skip without a CUDA GPU;
`tools/gpu_check.sh` runs them on one.

These assert behaviour (the compiled model trains the same numbers as the eager one; a compiled run's checkpoint
resumes without compiling), not speed: the speed figures come from `lm_basics_bench` and are quoted in the README.
"""
import json, re, subprocess, sys
from pathlib import Path
import pytest, torch




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
    assert re.search(r'^Compiled: no \(the default: 20 steps take about [\d.]+ min eager; compiling costs about \d+ s', eager.stdout, re.M), eager
    assert 'Compiled: yes (--compile given)' in compiled.stdout
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

def bench(lm, *args, cwd, timeout=600):
    "Run `lm_basics_bench ARGS` to the end, forked from the suite's fork server (its variants still run in processes of their own)."
    return lm.run(*args, cwd=cwd, script='lm_basics_bench', timeout=timeout)


def test_bench_writes_its_table_and_profile(tmp_path, lm):
    p = bench(lm, *TINY_BENCH, '--variants', 'eager:float32,eager:bfloat16', '--profile', '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert 'each run probes its own peak' in p.stdout and f"wrote {tmp_path/'res'}.md" in p.stdout   # no one probe for all rows
    res = json.loads((tmp_path/'res.json').read_text())
    rows = res['rows']
    assert [(r['compile'], r['dtype']) for r in rows] == [(False, 'float32'), (False, 'bfloat16')]
    for r in rows:
        assert r['tokens_per_sec'] > 0 and 0 < r['mfu'] <= 1.0 and r['params'] > 0
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


def test_bench_takes_a_training_config(tmp_path, lm):
    "`--config` benchmarks what lm_basics_train would build from the file; flags given beside it win."
    cfg = Path(__file__).resolve().parents[1]/'configs'/'demo.json'
    p = bench(lm, '--config', cfg, '--variants', 'eager:float32', '--steps', '1', '--warmup', '1', '--batch_size', '4',
              '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got, demo = json.loads((tmp_path/'res.json').read_text())['config'], json.loads(cfg.read_text())
    assert {k: got[k] for k in ('vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'device')} == \
           {k: demo[k] for k in ('vocab_size', 'context_length', 'd_model', 'num_layers', 'num_heads', 'd_ff', 'device')}
    assert got['batch_size'] == 4 and demo['batch_size'] != 4


@pytest.mark.parametrize('args,message', [
    (['--variants', 'fast:float32'], "--variants: 'fast:float32' is not MODE:DTYPE"),
    (['--variants', 'eager:float16'], '--variants: eager:float16 needs a CUDA GPU'),
    (['--loss_chunk', 'wide'], "--loss_chunk: loss_chunk must be int, got 'wide'"),
    (['--device', 'cuda'], 'no CUDA GPU'),
    (['--config', 'missing.json'], 'config file not found: missing.json'),
])
def test_bench_bad_input_is_one_clear_error(tmp_path, args, message, lm):
    if args == ['--device', 'cuda'] and torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    p = bench(lm, *TINY_BENCH, *args, '--out', tmp_path/'res', cwd=tmp_path, timeout=120)
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


def test_bench_baseline_runs_the_reference_beside_lm_basics(tmp_path, lm):
    "`--baseline`: the plain reference step and the trainer's, alternately, each in its own process, then side by side."
    p = bench(lm, *TINY_BENCH, '--baseline', '--rounds', '2', '--variants', 'eager:float32', '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path/'res.json').read_text())
    # round 0: the reference first; round 1: lm_basics first (so that a machine getting slower or faster favours neither)
    assert [(r['round'], r['model']) for r in res['rows']] == [(0, 'reference'), (0, 'lm_basics'), (1, 'lm_basics'), (1, 'reference')]
    ref, ours = ([r for r in res['rows'] if r['model'] == m] for m in ('reference', 'lm_basics'))
    assert ref[0]['params'] != ours[0]['params'] and abs(ref[0]['params'] / ours[0]['params'] - 1) < 0.1   # same shapes, own layers
    [side] = res['side_by_side']
    assert side['variant'] == 'eager float32' and len(side['per_round']) == 2
    assert side['ratio'] == pytest.approx(sum(r['tokens_per_sec'] for r in ours) / sum(r['tokens_per_sec'] for r in ref))
    assert side['per_round'] == pytest.approx([ours[0]['tokens_per_sec'] / ref[0]['tokens_per_sec'], ours[1]['tokens_per_sec'] / ref[1]['tokens_per_sec']])
    md = (tmp_path/'res.md').read_text()
    assert md.startswith('Command: `lm_basics_bench ') and '--baseline' in md.splitlines()[0]
    assert '| eager float32 |' in md and '| reference eager float32 |' in md and 'lm_basics / reference' in md
    bad = bench(lm, *TINY_BENCH, '--baseline', '--rounds', '0', '--out', tmp_path/'bad', cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith('error: --rounds must be at least 1'), bad.stderr


# ---------------------------------------------------------------------------------------------------- CUDA paths
# Run on a machine with a GPU by tools/gpu_check.sh (`pytest tests/test_speed_paths.py -k cuda`); skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')


def cuda_tiny(**kw):
    "A tiny model on the GPU, its trainer's step, and a fixed batch."
    from lm_basics.model import TransformerLM
    from lm_basics.optim import make_optimizer
    from lm_basics.train import TrainStep
    from lm_basics.bench import FixedBatch
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=2, d_ff=172).cuda()
    step = TrainStep(model, make_optimizer(model, lr=3e-3, device_type='cuda'), **kw)
    g = torch.Generator().manual_seed(0)
    batch = FixedBatch(*(torch.randint(256, (8, 32), generator=g).cuda() for _ in range(2)))
    return model, step, batch


@needs_cuda
def test_cuda_bfloat16_run_trains(tmp_path, corpus, lm):
    "A whole run on the GPU with the CUDA defaults: bfloat16 autocast (`--dtype auto`), float32 weights and checkpoint."
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    r = lm.run(*data, *lm.tiny_flags(device='cuda', max_iters=30, log_interval=1, lr=3e-3, min_lr=3e-4), '--no-compile',
               '--checkpoint_dir', tmp_path/'run', cwd=tmp_path).ok()
    assert 'Compute dtype: bfloat16' in r.stdout and 'Device: cuda' in r.stdout
    l = losses(lm, tmp_path/'run')
    assert l[-1] < l[0] - 0.5, l
    ck = lm.load_checkpoint(tmp_path/'run'/'checkpoint_iter_30.pt')
    assert {v.dtype for v in ck['model_state_dict'].values()} == {torch.float32}


@needs_cuda
def test_cuda_float16_uses_the_gradient_scaler():
    "float16 autocast trains through the gradient scaler, and a step whose scaled gradients overflow is skipped, not applied."
    model, step, batch = cuda_tiny(dtype='float16')
    assert step.scaler.is_enabled()
    first = step(batch).loss.item()
    for _ in range(10): last = step(batch).loss.item()
    assert last < first - 0.3, (first, last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step.scaler.update(2.0 ** 126)   # a scale that makes the float16 gradients overflow
    step(batch)
    assert step.scaler.get_scale() < 2.0 ** 126   # the scaler saw the overflow and backed off ...
    for k, v in model.state_dict().items(): torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)   # ... and skipped the update


@needs_cuda
def test_cuda_fused_adamw_matches_foreach():
    "On CUDA `make_optimizer` picks the fused AdamW; its step is the foreach step's."
    from lm_basics.model import TransformerLM
    from lm_basics.optim import make_optimizer
    torch.manual_seed(0)
    a = TransformerLM(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=2, d_ff=172).cuda()
    b = TransformerLM(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=2, d_ff=172).cuda()
    b.load_state_dict(a.state_dict())
    fused, foreach = make_optimizer(a, lr=1e-2, device_type='cuda'), make_optimizer(b, lr=1e-2, device_type='cpu')
    assert all(g['fused'] for g in fused.param_groups) and all(g['foreach'] for g in foreach.param_groups)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()): pa.grad = pb.grad = torch.randn_like(pa)
        fused.step(); foreach.step()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()): torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


@needs_cuda
def test_cuda_batches_are_pinned_copies_of_the_cpu_ones(tmp_path):
    "`get_batch` to CUDA (one pinned, non-blocking copy) and the prefetcher give the rows the CPU path gives."
    import numpy as np
    from lm_basics.data import get_batch, BatchPrefetcher
    data = np.arange(10_000, dtype=np.uint16)
    xc, yc = get_batch(data, 4, 16, 'cpu', torch.Generator().manual_seed(3))
    x, y = get_batch(data, 4, 16, 'cuda', torch.Generator().manual_seed(3))
    assert x.is_cuda and y.is_cuda and x.dtype == y.dtype == torch.int64
    assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc) and torch.equal(x[:, 1:], y[:, :-1])
    pf, g = BatchPrefetcher(data, 4, 16, 'cuda', torch.Generator().manual_seed(5)), torch.Generator().manual_seed(5)
    for _ in range(3):
        pf.prefetch()
        (px, py), (cx, cy) = pf.next(), get_batch(data, 4, 16, 'cpu', g)
        assert px.is_cuda and torch.equal(px.cpu(), cx) and torch.equal(py.cpu(), cy)


@needs_cuda
def test_cuda_compiled_step_trains_the_same_numbers():
    "The trainer's step through torch.compile (Inductor's Triton kernels) follows the eager step, in bfloat16."
    _, eager, batch = cuda_tiny(dtype='bfloat16')
    _, compiled, _ = cuda_tiny(dtype='bfloat16', compile=True)
    e = [eager(batch).loss.item() for _ in range(6)]
    c = [compiled(batch).loss.item() for _ in range(6)]
    assert e[-1] < e[0] - 0.2, e
    for a, b in zip(e, c): assert abs(a - b) < 3e-2 * max(1, abs(a)), (e, c)


@needs_cuda
def test_cuda_peak_table_knows_this_gpu():
    "The datasheet peak of this GPU is in `GPU_PEAK_TFLOPS`, above what a large bfloat16 matmul reaches and not far above it."
    from lm_basics.runtime import peak_flops
    dev = torch.device('cuda')
    peak, src = peak_flops(dev, 'bfloat16')
    assert peak > 0 and 'datasheet' in src, f"{torch.cuda.get_device_name(dev)} is not in GPU_PEAK_TFLOPS ({src}): add its dense bf16/fp32 peaks"
    assert peak_flops(dev, 'float32')[0] <= peak
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10): a @ b
    end.record(); torch.cuda.synchronize()
    measured = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    assert 0.3 * peak < measured < 1.1 * peak, (measured / 1e12, peak / 1e12)


@needs_cuda
def test_cuda_bench_runs_on_the_gpu(tmp_path, lm):
    "lm_basics_bench on the GPU: bfloat16 and float16 (with its scaler), the datasheet peak, the CUDA memory peak."
    p = bench(lm, *TINY_BENCH, '--device', 'cuda', '--variants', 'eager:bfloat16,eager:float16', '--out', tmp_path/'res', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path/'res.json').read_text())
    assert 'datasheet' in res['peak_source'] and [r['dtype'] for r in res['rows']] == ['bfloat16', 'float16']
    for r in res['rows']: assert r['tokens_per_sec'] > 0 and 0 < r['mfu'] < 1 and 0 < r['peak_mem_mb'] < 2000


@needs_cuda
@needs_2_gpus
def test_cuda_ddp_over_nccl(tmp_path, corpus, lm):
    "Two processes on two GPUs (torchrun, NCCL): DDP trains, and its losses follow one process with the global batch."
    torchrun = Path(sys.executable).parent/'torchrun'
    data = ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'), '--vocab_size', '256']
    flags = data + lm.tiny_flags(device='cuda', max_iters=12, log_interval=3, lr=3e-3, min_lr=3e-4) + ['--no-compile', '--dtype', 'float32']
    p = subprocess.run([str(torchrun), '--standalone', '--nproc_per_node', '2', '-m', 'lm_basics.train', *map(str, flags),
                        '--batch_size', '4', '--checkpoint_dir', str(tmp_path/'ddp')], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'x 2 processes' in p.stdout
    lm.run(*flags, '--batch_size', '8', '--checkpoint_dir', tmp_path/'one', cwd=tmp_path).ok()
    for a, b in zip(losses(lm, tmp_path/'ddp'), losses(lm, tmp_path/'one')): assert abs(a - b) < 5e-3
