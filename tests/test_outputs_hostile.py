"""What `lm_basics_generate`, `lm_basics_plot` and `lm_basics_export` do when their output turns hostile: a reader that goes
away (`| head`), stdout or the output directory on a full disk, an output path under a file, an export killed outright,
absurd numbers on the command line, and metrics files that are damaged, unreadable or not metrics at all.

A closed reader never costs the work: plot and export still write their files and exit 0, and generate (whose output IS
its result) stops quietly. Every other failure is one `error:` line, exit status 2, and nothing already written is lost.
Pipes and exit statuses need real processes, exec'd here (`subprocess`), since the suite's runner captures both streams.
"""
from __future__ import annotations
import json, math, os, signal, subprocess, time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st


def popen(lm, script:str, *args, cwd, stdout) -> subprocess.Popen:
    "The console script `script` with `args`, stdout to `stdout` (a file, or subprocess.PIPE), stderr captured."
    return subprocess.Popen([*lm.command(script), *map(str, args)], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)

def finish(p:subprocess.Popen, timeout:float=300) -> tuple[int, str]:
    "Wait for `p`; its exit status and stderr (killed, and the test failed, if it outlives `timeout`)."
    try: _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        pytest.fail(f"{p.args} still running after {timeout} s")
    return p.returncode, err.decode(errors='replace')

def one_error(rc:int, err:str) -> str:
    "Assert exit status 2, no traceback, and an `error:` line as the last line of stderr; return that line."
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and 'Traceback' not in err and lines and lines[-1].startswith('error: '), (rc, err)
    assert sum(l.startswith('error: ') for l in lines) == 1, err
    return lines[-1]



# ---------------------------------------------------------------------------------------------------- a reader that leaves

def test_generate_stops_quietly_when_the_reader_leaves(byte_run, tmp_path, lm):
    "`lm_basics_generate ... | head -c 10`: ten bytes read, then the pipe closes; generation stops at once, exit 0, no traceback."
    p = popen(lm, 'lm_basics_generate', '--checkpoint', byte_run, '--max_new_tokens', 10**9, '--seed', 0, '--device', 'cpu',
              cwd=tmp_path, stdout=subprocess.PIPE)
    got = p.stdout.read(10); p.stdout.close()
    t0 = time.monotonic()
    rc, err = finish(p, timeout=120)
    assert len(got) == 10 and rc == 0 and 'Traceback' not in err and 'error' not in err, (rc, err)
    assert time.monotonic() - t0 < 60   # it stopped; a billion tokens would take days

@pytest.mark.parametrize('script', ['lm_basics_plot', 'lm_basics_export'])
def test_plot_and_export_keep_their_work_when_the_reader_leaves(script, byte_run, tmp_path, lm):
    "`lm_basics_plot ... | true` and `lm_basics_export ... | head -c 0`: the reader is gone before a word; the files are written, exit 0."
    out = tmp_path/('loss.png' if script == 'lm_basics_plot' else 'hf')
    args = [byte_run, '--out', out] if script == 'lm_basics_plot' else ['--checkpoint', byte_run, '--out', out, '--no-verify']
    p = popen(lm, script, *args, cwd=tmp_path, stdout=subprocess.PIPE)
    p.stdout.close()   # before it prints anything
    rc, err = finish(p)
    assert rc == 0 and err == '', (rc, err)
    if script == 'lm_basics_plot': assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    else: assert {'config.json', 'model.safetensors', 'tokenizer.json', 'README.md'} <= {f.name for f in out.iterdir()}


# ---------------------------------------------------------------------------------------------------- a full disk

def test_generate_to_a_full_disk_is_one_error(byte_run, tmp_path, lm):
    "`lm_basics_generate ... > /dev/full`: the text was the point, so failing to write it is an error, said once."
    if not Path('/dev/full').exists(): lm.missing_tool("no /dev/full on this system")
    with open('/dev/full', 'wb') as full:
        p = popen(lm, 'lm_basics_generate', '--checkpoint', byte_run, '--max_new_tokens', 50, '--device', 'cpu', cwd=tmp_path, stdout=full)
        line = one_error(*finish(p))
    assert 'cannot write the generated text to stdout (No space left on device); free disk space' in line, line

def test_export_to_a_full_disk_leaves_everything_as_it_was(byte_run, tmp_path, lm):
    "An export onto a full disk: one error naming the cause; no temporary left; the export it was to replace (--force) untouched."
    mnt = tmp_path/'small'
    lm.mount_small_tmpfs(mnt, 64 * 1024)   # the weights alone need over 100 KB
    try:
        (mnt/'hf').mkdir(); (mnt/'hf'/'config.json').write_text('an earlier export')
        before = lm.snapshot(mnt)
        r = lm.run('--checkpoint', byte_run, '--out', mnt/'hf', '--no-verify', '--force', cwd=tmp_path, script='lm_basics_export')
        r.error('cannot write the export to', 'No space left on device', 'free disk space', 'nothing was written')
        assert lm.snapshot(mnt) == before   # no temporary directory, no half-written file, the old export as it was
    finally: subprocess.run(['umount', '-l', str(mnt)])


# ---------------------------------------------------------------------------------------------------- where the export goes

def test_export_under_a_file_says_so(byte_run, tmp_path, lm):
    (tmp_path/'notes.txt').write_text('my notes')
    r = lm.run('--checkpoint', byte_run, '--out', tmp_path/'notes.txt'/'model', '--no-verify', cwd=tmp_path, script='lm_basics_export')
    r.error('notes.txt, which is a file, not a directory')
    assert (tmp_path/'notes.txt').read_text() == 'my notes' and sorted(tmp_path.iterdir()) == [tmp_path/'notes.txt']

def test_a_killed_export_is_swept_by_the_next(byte_run, tmp_path, lm):
    """SIGKILL during an export leaves its temporary directory (`.hf.tmp-PID`); the next export into the same directory
    removes it, while the temporary directory of an export still running stays (it holds a lock on it)."""
    p = popen(lm, 'lm_basics_export', '--checkpoint', byte_run, '--out', tmp_path/'hf', cwd=tmp_path, stdout=subprocess.DEVNULL)
    tmp, deadline = tmp_path/f'.hf.tmp-{p.pid}', time.monotonic() + 240
    while not (tmp/'model.safetensors').exists():   # written, and now being verified by transformers (a second or more)
        assert p.poll() is None and time.monotonic() < deadline, (p.returncode, p.stderr.read().decode())
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert tmp.is_dir() and not (tmp_path/'hf').exists()   # what a killed export leaves
    lm.run('--checkpoint', byte_run, '--out', tmp_path/'hf2', '--no-verify', cwd=tmp_path, script='lm_basics_export').ok()
    assert sorted(f.name for f in tmp_path.iterdir()) == ['hf2']


# ---------------------------------------------------------------------------------------------------- absurd numbers

def test_generate_refuses_a_seed_training_would_refuse(byte_run, tmp_path, lm):
    for seed in (2**70, -1, 2**32):
        lm.run('--checkpoint', byte_run, '--seed', seed, cwd=tmp_path, script='lm_basics_generate').error(
            'seed must lie in [0, 2**32 - 1] = [0, 4294967295]', f'got {seed}')

SWEEP = {'max_new_tokens': ['-1', '0', '2', '1e1', 'inf', '-inf', 'nan', '2.5', '1e400'],
         'temperature': ['-1', '0', '-0', '1e-320', '5e-324', '1e308', '1e400', 'inf', '-inf', 'nan'],
         'top_k': ['-1', '0', '1', '1e30', str(10**30), 'inf', 'nan'],
         'top_p': ['0', '-0.5', '1e-300', '1', '1.0000001', 'inf', '-inf', 'nan'],
         'seed': ['-1', '0', '4294967295', '4294967296', str(2**70), '1e3', 'nan']}

@pytest.mark.parametrize('flag', list(SWEEP))
def test_generate_numbers_work_or_are_refused_in_one_line(flag, byte_run, capsys):
    "Each absurd value of a numeric flag either samples (exit 0) or is one `error:` line naming the flag (exit 2), in process."
    from lm_basics.generate import main
    for value in SWEEP[flag]:
        base = {'max_new_tokens': '3', 'seed': '0', flag: value}
        argv = ['--checkpoint', str(byte_run), '--device', 'cpu', '--no-echo', *(a for k, v in base.items() for a in (f'--{k}', v))]
        try: main(argv); code = 0
        except SystemExit as e: code = e.code
        out, err = capsys.readouterr()
        if code == 0: assert out.endswith('\n') and err.startswith('[') and err.count('\n') == 1, (value, out, err)
        else:
            assert code == 2 and out == '' and err.count('\n') == 1 and err.startswith('error: '), (value, code, out, err)
            assert flag in err or flag.replace('_', '-') in err, (value, err)


# ---------------------------------------------------------------------------------------------------- metrics files

def hostile_metrics(case:str, d:Path) -> Path:
    d.mkdir()
    f = d/'metrics.jsonl'
    if case == 'time is text': f.write_text('{"iter": 0, "time": "x", "train/loss": 5.5}\n')
    if case == 'a directory': f.mkdir()
    if case == 'random bytes': f.write_bytes(os.urandom(50_000).replace(b'{', b'('))
    if case == 'unreadable': f.write_text('{"iter": 0, "time": 0.1, "train/loss": 5.5}\n'); f.chmod(0)
    return d

PLOT_ERRORS = {'time is text': ["is not an lm_basics metrics.jsonl: line 1 is b'{\"iter\": 0, \"time\": \"x\""],
               'a directory': ['metrics.jsonl is not a file'], 'random bytes': ['is not an lm_basics metrics.jsonl'],
               'unreadable': ['cannot read', 'Permission denied']}

@pytest.mark.parametrize('case', list(PLOT_ERRORS))
def test_plot_of_a_bad_metrics_file_is_one_clear_line(case, tmp_path, lm):
    if case == 'unreadable': lm.need_unprivileged()
    d = hostile_metrics(case, tmp_path/'run')
    r = lm.run(d, '--out', tmp_path/'x.png', cwd=tmp_path, script='lm_basics_plot', unprivileged=case == 'unreadable')
    r.error(*PLOT_ERRORS[case])
    assert not (tmp_path/'x.png').exists()

def test_plot_of_a_checkpoint_is_not_no_losses_yet(byte_run, tmp_path, lm):
    "Plotting a file that is no metrics file at all (a checkpoint, by mistake) says so, not 'no losses recorded yet'."
    r = lm.run(byte_run/'checkpoint_iter_20.pt', '--out', tmp_path/'x.png', cwd=tmp_path, script='lm_basics_plot')
    r.error('checkpoint_iter_20.pt is not an lm_basics metrics.jsonl', 'pass the checkpoint_dir of a run')


# ---------------------------------------------------------------------------------------------------- the metrics reader, fuzzed

def valid_lines(byte_run) -> list[bytes]:
    return (byte_run/'metrics.jsonl').read_bytes().splitlines(keepends=True)

ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True),
                st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

@st.composite
def metrics_files(draw, lines:list[bytes]) -> bytes:
    "Random bytes; a valid file cut anywhere, with bytes changed; or records whose fields have any JSON type."
    kind = draw(st.sampled_from(['bytes', 'damaged', 'typed']))
    if kind == 'bytes': return draw(st.binary(max_size=400))
    if kind == 'damaged':
        data = bytearray(b''.join(lines)[:draw(st.integers(0, sum(map(len, lines))))])
        for _ in range(draw(st.integers(0, 4))):
            if data: data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    recs = draw(st.lists(st.fixed_dictionaries({'iter': ANY, 'time': ANY, 'train/loss': ANY, 'eval/val_loss': ANY,
                                                'train/learning_rate': ANY}), max_size=4))
    return b''.join(json.dumps(r).encode() + b'\n' for r in recs)

def check_read(path:Path):
    "read_metrics and load_run give valid records and series, or an LMBasicsError; nothing else."
    from lm_basics.core import LMBasicsError
    from lm_basics.records import read_metrics, load_run
    try: recs, series = read_metrics(path), load_run(path)
    except LMBasicsError: return
    for r in recs:
        assert type(r['iter']) is int and r['iter'] >= 0, r
        assert 'time' not in r or (type(r['time']) in (int, float) and math.isfinite(r['time'])), r
    for points in series.values():
        for it, t, v in points: assert type(it) is int and type(t) is float and type(v) is float and math.isfinite(v)

@pytest.fixture(scope='module')
def fuzz_dir(tmp_path_factory): return tmp_path_factory.mktemp('fuzz')

def test_metrics_reader_fuzzed(byte_run, fuzz_dir):
    lines = valid_lines(byte_run)
    assert len(lines) > 5

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(metrics_files(lines))
    def check(data):
        (fuzz_dir/'metrics.jsonl').write_bytes(data)
        check_read(fuzz_dir/'metrics.jsonl')
    check()
