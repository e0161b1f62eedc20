"""Data-parallel (DDP) and sharded (FSDP2) training with real `torchrun` processes on the CPU (gloo backend).

Each run trains a tiny model on the built-in Shakespeare corpus (bytes). The checks follow issue #5: DDP trains,
checkpoints and resumes (including across process counts); two processes with batch B follow one process with
batch 2B; an FSDP2 run trains and its checkpoint loads in a single process. Two runs serve most tests (module fixture
`pair`): two processes with batch 4 (torchrun running the console script) and one process with batch 8.
`--fsdp` without torchrun is a bad input (`test_bad_input.py`, fsdp-without-torchrun).
"""
import json
from pathlib import Path
import pytest, torch

from lm_basics.checkpoint import read_checkpoint, load_checkpoint
from lm_basics.model import TransformerLM, MODEL_ARGS
from lm_basics.optim import make_optimizer


def tiny(lm) -> list:
    "The suite's tiny settings on the built-in byte corpus: 2 layers (something to shard), 12 steps; the batch is each test's."
    return ['--dataset', 'shakespeare_bytes', *lm.tiny_flags(vocab_size=256, d_ff=96, num_layers=2, max_iters=12, lr=3e-3, min_lr=3e-4,
                                                              eval_interval=6, log_interval=3, checkpoint_interval=6, batch_size=None), '--no-plot']


def train(lm, *args, cwd, nproc=None, script=False) -> str:
    "`lm_basics_train ARGS`, or under torchrun with `nproc` processes: `-m lm_basics.train`, or the console script itself; its stdout."
    if not nproc: return lm.run(*args, cwd=cwd).ok().stdout
    target = lm.command() if script else ['-m', 'lm_basics.train']
    return lm.run('--standalone', '--nproc_per_node', nproc, *target, *args, cwd=cwd, script='torchrun').ok().stdout


def losses(lm, d): return [(r['iter'], r['train/loss']) for r in lm.read_metrics(d) if 'train/loss' in r]


def weights(path):
    return read_checkpoint(path)['model_state_dict']


def assert_close_weights(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-3, msg=k)


@pytest.fixture(scope='module')
def pair(tmp_path_factory, lm) -> dict:
    "Side by side: 2 processes x batch 4 (torchrun running the console script), and 1 process x batch 8, the same global batch."
    root = tmp_path_factory.mktemp('ddp')
    out2, out1 = lm.in_parallel(lambda a: train(lm, *a[0], cwd=root, nproc=a[1], script=True),
                                [([*tiny(lm), '--batch_size', 4, '--checkpoint_dir', root/'ddp'], 2),
                                 ([*tiny(lm), '--batch_size', 8, '--checkpoint_dir', root/'one'], None)])
    return dict(ddp=root/'ddp', one=root/'one', ddp_out=out2, one_out=out1)


def test_ddp_matches_one_process_with_the_global_batch(pair, lm):
    assert 'Device: cpu x 2 processes' in pair['ddp_out'] and 'Tokens per iteration: 256' in pair['ddp_out']
    ddp, one = losses(lm, pair['ddp']), losses(lm, pair['one'])
    assert [i for i, _ in ddp] == [i for i, _ in one] == [0, 3, 6, 9, 11]
    for (_, a), (_, b) in zip(ddp, one): assert abs(a - b) < 1e-3, (ddp, one)
    assert ddp[-1][1] < ddp[0][1] - 0.5           # it learned
    assert_close_weights(weights(pair['ddp']/'checkpoint_iter_12.pt'), weights(pair['one']/'checkpoint_iter_12.pt'))


def test_ddp_resumes_under_ddp_and_across_process_counts(pair, tmp_path, lm):
    full, one = pair['ddp'], pair['one']
    final = weights(full/'checkpoint_iter_12.pt')
    # the DDP checkpoint at 6 resumed with 2 processes, and in ONE process with the same global batch (8), side by side
    part, single = tmp_path/'part', tmp_path/'single'
    out, out1 = lm.in_parallel(lambda a: train(lm, *a[0], cwd=tmp_path, nproc=a[1]),
                               [(['--resume_from', full/'checkpoint_iter_6.pt', '--checkpoint_dir', part], 2),
                                (['--resume_from', full/'checkpoint_iter_6.pt', '--checkpoint_dir', single, '--batch_size', '8'], None)])
    assert 'Resumed from' in out and 'at iteration 6' in out
    assert_close_weights(final, weights(part/'checkpoint_iter_12.pt'))   # ends where the uninterrupted run does
    # a branch into a new directory: the records up to iteration 6 come with it, and step 6 is the first one it takes
    assert [i for i, _ in losses(lm, part)] == [0, 3, 6, 9, 11] and losses(lm, part)[:2] == losses(lm, full)[:2]
    assert 'Resume: batch_size: 4 -> 8' in out1
    assert_close_weights(final, weights(single/'checkpoint_iter_12.pt'))
    # and the reverse: a one-process checkpoint continued by two processes with batch 4 each
    rev = tmp_path/'rev'
    train(lm, '--resume_from', one/'checkpoint_iter_6.pt', '--checkpoint_dir', rev, '--batch_size', '4', cwd=tmp_path, nproc=2)
    assert_close_weights(weights(one/'checkpoint_iter_12.pt'), weights(rev/'checkpoint_iter_12.pt'))
    # --resume auto under torchrun picks the newest checkpoint: a finished run stays finished
    out = train(lm, '--resume', 'auto', '--checkpoint_dir', rev, cwd=tmp_path, nproc=2)
    assert 'at iteration 12' in out and 'Training complete: 12 iterations' in out


def test_ddp_gradient_accumulation_matches(pair, tmp_path, lm):
    train(lm, *tiny(lm), '--batch_size', '2', '--gradient_accumulation_steps', '2', '--checkpoint_dir', tmp_path/'acc', cwd=tmp_path, nproc=2)
    # 2 micro-batches of 2 per rank are slices of the same draw as 1 batch of 4 per rank: the same rows, the same training
    a, b = losses(lm, tmp_path/'acc'), losses(lm, pair['ddp'])
    assert a[-1][1] < a[0][1] - 0.5 and [i for i, _ in a] == [i for i, _ in b]
    for (_, x), (_, y) in zip(a, b): assert abs(x - y) < 1e-3, (a, b)
    assert_close_weights(weights(tmp_path/'acc'/'checkpoint_iter_12.pt'), weights(pair['ddp']/'checkpoint_iter_12.pt'))


def test_ddp_with_muon_and_wsd_matches_one_process(tmp_path, lm):
    """The newer recipe (Muon for the matrices, AdamW for the rest, warmup-stable-decay, QK-norm, ReLU²) under DDP: two
    processes with batch 4 follow one process with batch 8 (DDP averages the gradients before Muon orthogonalises them),
    and the run resumes under DDP from its checkpoint to the same end."""
    recipe = ['--optimizer', 'muon', '--lr_schedule', 'wsd', '--qk_norm', '--activation', 'relu2']
    runs = [([*tiny(lm), *recipe, '--batch_size', 4, '--checkpoint_dir', tmp_path/'ddp'], 2),
            ([*tiny(lm), *recipe, '--batch_size', 8, '--checkpoint_dir', tmp_path/'one'], None)]
    out2, _ = lm.in_parallel(lambda a: train(lm, *a[0], cwd=tmp_path, nproc=a[1]), runs)
    assert 'Device: cpu x 2 processes' in out2
    ddp, one = losses(lm, tmp_path/'ddp'), losses(lm, tmp_path/'one')
    assert [i for i, _ in ddp] == [i for i, _ in one] == [0, 3, 6, 9, 11]
    for (_, a), (_, b) in zip(ddp, one): assert abs(a - b) < 2e-3, (ddp, one)
    assert ddp[-1][1] < ddp[0][1] - 0.5
    assert_close_weights(weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'), weights(tmp_path/'one'/'checkpoint_iter_12.pt'), atol=5e-4)
    ck = read_checkpoint(tmp_path/'ddp'/'checkpoint_iter_12.pt')
    assert ck['config']['optimizer'] == 'muon' and ck['config']['lr_schedule'] == 'wsd'
    # resumed under DDP from iteration 6: the same end as the uninterrupted DDP run
    train(lm, '--resume_from', tmp_path/'ddp'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'resumed', cwd=tmp_path, nproc=2)
    assert_close_weights(weights(tmp_path/'resumed'/'checkpoint_iter_12.pt'), weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'), atol=1e-6)


def test_fsdp_trains_and_its_checkpoint_loads_in_one_process(pair, tmp_path, lm):
    out = train(lm, *tiny(lm), '--batch_size', '4', '--fsdp', '--checkpoint_dir', tmp_path/'fsdp', cwd=tmp_path, nproc=2)
    assert 'Training complete: 12 iterations' in out
    ck = read_checkpoint(tmp_path/'fsdp'/'checkpoint_iter_12.pt')
    model = TransformerLM(**{k: ck['config'][k] for k in MODEL_ARGS})
    opt = make_optimizer(model)
    assert load_checkpoint(ck, model, opt) == 12
    assert all(isinstance(v, torch.Tensor) and not hasattr(v, 'placements') for v in ck['model_state_dict'].values())
    # sharding changes where the numbers live, not what they are
    assert_close_weights(ck['model_state_dict'], weights(pair['ddp']/'checkpoint_iter_12.pt'))
    # and it resumes in a single process
    out = train(lm, '--resume_from', tmp_path/'fsdp'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'fsdp_single',
                '--batch_size', '8', '--no-fsdp', cwd=tmp_path)
    assert 'Training complete: 12 iterations' in out


def _prepare(root, barrier):
    from lm_basics.data import builtin_dataset
    barrier.wait()
    return builtin_dataset('shakespeare_bytes', root)


def test_ranks_preparing_the_builtin_dataset_at_once_all_succeed(tmp_path):
    # every torchrun rank calls builtin_dataset on a fresh cache at the same moment; a shared temporary name made
    # one rank's os.replace fail ("cannot write the dataset") and the whole run exit 2. The processes are forked (not
    # spawned): they start with lm_basics already imported, so the six are at the barrier in a moment.
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from lm_basics.data import load_tokens
    ctx, n = mp.get_context('fork'), 6
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ProcessPoolExecutor(n, mp_context=ctx) as ex:
            for k in range(5):
                root = tmp_path/f'cache{k}'
                results = list(ex.map(_prepare, [root]*n, [barrier]*n))
                assert len({tuple(map(str, r)) for r in results}) == 1
                assert json.loads((root/'shakespeare_bytes'/'meta.json').read_text())['vocab_size'] == 256
                assert len(load_tokens(results[0][0], 256, 32)) > 4_000_000
                assert not [p for p in (root/'shakespeare_bytes').iterdir() if '.tmp' in p.name]   # no leftovers


def test_two_nodes_through_rendezvous(pair, tmp_path, lm):
    # the README's two-machine command, with both "machines" on this one: two torchrun launchers, one process each,
    # meeting through the c10d rendezvous; together they train exactly as two processes of one launcher do
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    launch = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}',
              '--rdzv_id', 'lm_basics_test', '-m', 'lm_basics.train', *tiny(lm), '--batch_size', '4', '--checkpoint_dir', tmp_path/'nodes']
    nodes = [lm.start(*launch, cwd=tmp_path, script='torchrun') for _ in range(2)]
    outs = [p.finish().ok().stdout for p in nodes]
    assert sum('Device: cpu x 2 processes' in o for o in outs) == 1   # rank 0 alone logs, on whichever node it is
    assert losses(lm, tmp_path/'nodes') == losses(lm, pair['ddp'])
    assert_close_weights(weights(tmp_path/'nodes'/'checkpoint_iter_12.pt'), weights(pair['ddp']/'checkpoint_iter_12.pt'), atol=0)


def test_total_batch_size_keeps_the_step_across_process_counts(tmp_path, lm):
    # 2 processes x batch 4 x 32 tokens = 256 tokens per step; resumed in one process, the same 256 take 2 micro-steps,
    # which slice the same draw of rows: the run ends where the 2-process run ends, with no batch flag given
    train(lm, *tiny(lm), '--batch_size', '4', '--total_batch_size', '256', '--checkpoint_dir', tmp_path/'ddp', cwd=tmp_path, nproc=2)
    out = train(lm, '--resume_from', tmp_path/'ddp'/'checkpoint_iter_6.pt', '--checkpoint_dir', tmp_path/'one', cwd=tmp_path)
    assert 'gradient_accumulation_steps 1 -> 2' in out and 'Tokens per iteration: 256' in out
    assert_close_weights(weights(tmp_path/'ddp'/'checkpoint_iter_12.pt'), weights(tmp_path/'one'/'checkpoint_iter_12.pt'))


def test_a_killed_rank_is_named_once_without_a_traceback(tmp_path, lm):
    """Rank 1 killed (SIGKILL) mid-run: rank 0 does not print gloo's traceback; it says, in one `error:` line, that rank 1
    of the run stopped and how to continue. (torchrun's own summary of the failed child follows; that is the launcher.)"""
    import psutil, signal, re
    p = lm.start('--standalone', '--nproc_per_node', 2, *lm.command(), *tiny(lm), '--batch_size', 4, '--max_iters', 100000,
                 '--no-compile', '--checkpoint_dir', tmp_path/'run', cwd=tmp_path, script='torchrun')
    p.wait_for(r'^Iter\s+3 ')
    workers = {int(c.environ().get('LOCAL_RANK', -1)): c for c in psutil.Process(p.pid).children(recursive=True)
               if 'LOCAL_RANK' in c.environ()}
    workers[1].send_signal(signal.SIGKILL)
    run = p.finish()
    assert run.returncode != 0, run
    errors = [l for l in run.stderr.splitlines() if l.startswith('error')]
    assert errors == [errors[0]] and re.match(r'error: rank 1 of this distributed run stopped', errors[0]), run
    assert 'pair.cc' not in run.stderr and 'Connection reset' not in run.stderr, run
