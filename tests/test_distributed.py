"""Data-parallel (DDP) and sharded (FSDP2) training with real `torchrun` processes on the CPU (gloo backend).

Each run trains a tiny model on the built-in Shakespeare corpus (bytes). The checks follow issue #5: DDP trains,
checkpoints and resumes (including across process counts); two processes with batch B follow one process with
batch 2B; an FSDP2 run trains and its checkpoint loads in a single process.
"""
import os, subprocess, sys, json
from pathlib import Path
import pytest, torch

from lm_basics.checkpoint import read_checkpoint, load_checkpoint
from lm_basics.model import TransformerLM, MODEL_ARGS
from lm_basics.optim import make_optimizer

BIN = Path(sys.executable).parent
TINY = ['--dataset', 'shakespeare_bytes', '--vocab_size', '256', '--context_length', '32', '--d_model', '32',
        '--num_heads', '2', '--d_ff', '96', '--num_layers', '2', '--max_iters', '12', '--warmup_iters', '2',
        '--lr', '3e-3', '--min_lr', '3e-4', '--eval_interval', '6', '--eval_iters', '2', '--log_interval', '3',
        '--checkpoint_interval', '6', '--device', 'cpu']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = dict(os.environ, LM_BASICS_CACHE=str(tmp_path_factory.mktemp('cache')), OMP_NUM_THREADS='1',
             WANDB_MODE='offline', MPLBACKEND='Agg')
    return e


def run(args, env, nproc=None, timeout=300, script=False):
    "`lm_basics_train ARGS`, or under torchrun with `nproc` processes: `-m lm_basics.train`, or the console script itself."
    target = [str(BIN/'lm_basics_train')] if script else ['-m', 'lm_basics.train']
    cmd = ([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', str(nproc), *target] if nproc
           else [str(BIN/'lm_basics_train')]) + [str(a) for a in args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-3000:]}"
    return p.stdout


def losses(d):
    return [(r['iter'], r['train/loss']) for r in map(json.loads, Path(d, 'metrics.jsonl').read_text().splitlines()) if 'train/loss' in r]


def weights(path):
    return read_checkpoint(path)['model_state_dict']


def assert_close_weights(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-3, msg=k)


def test_ddp_matches_one_process_with_the_global_batch(tmp_path, env):
    out = run(TINY + ['--batch_size', '4', '--checkpoint_dir', tmp_path/'ddp'], env, nproc=2)
    assert 'Device: cpu x 2 processes' in out and 'Tokens per iteration: 256' in out
    run(TINY + ['--batch_size', '8', '--checkpoint_dir', tmp_path/'one'], env)
    ddp, one = losses(tmp_path/'ddp'), losses(tmp_path/'one')
    assert [i for i, _ in ddp] == [i for i, _ in one] == [0, 3, 6, 9, 11]
    for (_, a), (_, b) in zip(ddp, one): assert abs(a - b) < 1e-3, (ddp, one)
    assert ddp[-1][1] < ddp[0][1] - 0.5           # it learned
    assert_close_weights(weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'), weights(tmp_path/'one'/'checkpoint_iter_12.pt'))


def test_ddp_resumes_under_ddp_and_across_process_counts(tmp_path, env):
    full = tmp_path/'full'
    run(TINY + ['--batch_size', '4', '--checkpoint_dir', full], env, nproc=2)
    final = weights(full/'checkpoint_iter_12.pt')
    # the DDP checkpoint at 6, resumed with 2 processes, ends where the uninterrupted run does
    part = tmp_path/'part'
    out = run(['--resume_from', full/'checkpoint_iter_6.pt', '--checkpoint_dir', part], env, nproc=2)
    assert 'Resumed from' in out and 'at iteration 6' in out
    assert_close_weights(final, weights(part/'checkpoint_iter_12.pt'))
    # a branch into a new directory: the records up to iteration 6 come with it, and step 6 is the first one it takes
    assert [i for i, _ in losses(part)] == [0, 3, 6, 9, 11] and losses(part)[:2] == losses(full)[:2]
    # ... and resumed in ONE process with the same global batch (8)
    single = tmp_path/'single'
    out = run(['--resume_from', full/'checkpoint_iter_6.pt', '--checkpoint_dir', single, '--batch_size', '8'], env)
    assert 'Resume: batch_size: 4 -> 8' in out
    assert_close_weights(final, weights(single/'checkpoint_iter_12.pt'))
    # and the reverse: a one-process checkpoint continued by two processes with batch 4 each
    one = tmp_path/'one'
    run(TINY + ['--batch_size', '8', '--checkpoint_dir', one], env)
    rev = tmp_path/'rev'
    run(['--resume_from', one/'checkpoint_iter_6.pt', '--checkpoint_dir', rev, '--batch_size', '4'], env, nproc=2)
    assert_close_weights(weights(one/'checkpoint_iter_12.pt'), weights(rev/'checkpoint_iter_12.pt'))
    # --resume auto under torchrun picks the newest checkpoint: a finished run stays finished
    out = run(['--resume', 'auto', '--checkpoint_dir', rev], env, nproc=2)
    assert 'at iteration 12' in out and 'Training complete: 12 iterations' in out


def test_ddp_gradient_accumulation_matches(tmp_path, env):
    run(TINY + ['--batch_size', '2', '--gradient_accumulation_steps', '2', '--checkpoint_dir', tmp_path/'acc'], env, nproc=2)
    out = run(TINY + ['--batch_size', '4', '--checkpoint_dir', tmp_path/'ddp'], env, nproc=2, script=True)   # the console script
    assert 'Device: cpu x 2 processes' in out
    # 2 micro-batches of 2 per rank are slices of the same draw as 1 batch of 4 per rank: the same rows, the same training
    a, b = losses(tmp_path/'acc'), losses(tmp_path/'ddp')
    assert a[-1][1] < a[0][1] - 0.5 and [i for i, _ in a] == [i for i, _ in b]
    for (_, x), (_, y) in zip(a, b): assert abs(x - y) < 1e-3, (a, b)
    assert_close_weights(weights(tmp_path/'acc'/'checkpoint_iter_12.pt'), weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'))


def test_fsdp_trains_and_its_checkpoint_loads_in_one_process(tmp_path, env):
    out = run(TINY + ['--batch_size', '4', '--fsdp', '--checkpoint_dir', tmp_path/'fsdp'], env, nproc=2)
    assert 'Training complete: 12 iterations' in out
    run(TINY + ['--batch_size', '4', '--checkpoint_dir', tmp_path/'ddp'], env, nproc=2)
    ck = read_checkpoint(tmp_path/'fsdp'/'checkpoint_iter_12.pt')
    model = TransformerLM(**{k: ck['config'][k] for k in MODEL_ARGS})
    opt = make_optimizer(model)
    assert load_checkpoint(ck, model, opt) == 12
    assert all(isinstance(v, torch.Tensor) and not hasattr(v, 'placements') for v in ck['model_state_dict'].values())
    # sharding changes where the numbers live, not what they are
    assert_close_weights(ck['model_state_dict'], weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'))
    # and it resumes in a single process
    out = run(['--resume_from', tmp_path/'fsdp'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'fsdp_single',
               '--batch_size', '8', '--no-fsdp'], env)
    assert 'Training complete: 12 iterations' in out


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, env):
    p = subprocess.run([str(BIN/'lm_basics_train')] + TINY + ['--fsdp', '--checkpoint_dir', str(tmp_path/'x')],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith('error: --fsdp') and 'Traceback' not in p.stderr + p.stdout


def _prepare(root, barrier):
    from lm_basics.data import builtin_dataset
    barrier.wait()
    return builtin_dataset('shakespeare_bytes', root)


def test_ranks_preparing_the_builtin_dataset_at_once_all_succeed(tmp_path):
    # every torchrun rank calls builtin_dataset on a fresh cache at the same moment; a shared temporary name made
    # one rank's os.replace fail ("cannot write the dataset") and the whole run exit 2
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from lm_basics.data import load_tokens
    ctx, n = mp.get_context('spawn'), 6
    barrier = mp.Manager().Barrier(n)
    with ProcessPoolExecutor(n, mp_context=ctx) as ex:
        for k in range(5):
            root = tmp_path/f'cache{k}'
            results = list(ex.map(_prepare, [root]*n, [barrier]*n))
            assert len({tuple(map(str, r)) for r in results}) == 1
            assert json.loads((root/'shakespeare_bytes'/'meta.json').read_text())['vocab_size'] == 256
            assert len(load_tokens(results[0][0], 256, 32)) > 4_000_000
            assert not [p for p in (root/'shakespeare_bytes').iterdir() if '.tmp' in p.name]   # no leftovers


def test_two_nodes_through_rendezvous(tmp_path, env):
    # the README's two-machine command, with both "machines" on this one: two torchrun launchers, one process each,
    # meeting through the c10d rendezvous; together they train exactly as two processes of one launcher do
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    args = [str(a) for a in TINY + ['--batch_size', '4', '--checkpoint_dir', tmp_path/'nodes']]
    launch = [str(BIN/'torchrun'), '--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d',
              '--rdzv_endpoint', f'127.0.0.1:{port}', '--rdzv_id', 'lm_basics_test', '-m', 'lm_basics.train', *args]
    nodes = [subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (o, e) in zip(nodes, outs): assert p.returncode == 0, f"STDOUT\n{o[-3000:]}\nSTDERR\n{e[-3000:]}"
    assert sum('Device: cpu x 2 processes' in o for o, _ in outs) == 1   # rank 0 alone logs, on whichever node it is
    run(TINY + ['--batch_size', '4', '--checkpoint_dir', tmp_path/'one_node'], env, nproc=2)
    assert losses(tmp_path/'nodes') == losses(tmp_path/'one_node')
    assert_close_weights(weights(tmp_path/'nodes'/'checkpoint_iter_12.pt'), weights(tmp_path/'one_node'/'checkpoint_iter_12.pt'), atol=0)


def test_total_batch_size_keeps_the_step_across_process_counts(tmp_path, env):
    # 2 processes x batch 4 x 32 tokens = 256 tokens per step; resumed in one process, the same 256 take 2 micro-steps,
    # which slice the same draw of rows: the run ends where the 2-process run ends, with no batch flag given
    run(TINY + ['--batch_size', '4', '--total_batch_size', '256', '--checkpoint_dir', tmp_path/'ddp'], env, nproc=2)
    out = run(['--resume_from', tmp_path/'ddp'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'one'], env)
    assert 'gradient_accumulation_steps 1 -> 2' in out and 'Tokens per iteration: 256' in out
    assert_close_weights(weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'), weights(tmp_path/'one'/'checkpoint_iter_12.pt'))
