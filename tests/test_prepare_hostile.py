"""`lm_basics_prepare` against a hostile user, on real processes (and its file readers against random bytes).

| guarantee | test |
|---|---|
| a closed reader (`| head -1`, a pipe closed at once, `>&- 2>&-`) costs no work: the data is published, exit 0 | `test_closed_stdout_keeps_the_work`, `test_head_keeps_the_work`, `test_closed_stdout_and_stderr` |
| every numeric flag, at absurd values, works or is one `error:` line (exit 2) with nothing created | `test_numeric_flags_work_or_refuse_clearly` |
| SIGINT during BPE training, SIGTERM during encoding: out within seconds (not at the end of the Rust call), nothing left | `test_signal_during_training_stops_at_once`, `test_signal_during_encoding_stops_at_once` |
| text without repeated words (random letters) trains in bounded time and memory | `test_random_letters_train_in_bounded_memory` |
| an input that grows while it is prepared is refused, nothing published | `test_growing_input_is_refused` |
| an input deleted, or the temporary directory removed, while it runs: one clear error that says which | `test_removed_underneath` |
| `/dev/zero`, a FIFO: named as what they are (not "not found"), and the fix; a FIFO does not hang | `test_inputs_that_are_not_regular_files` |
| a stale `.prepare-PID` whose pid is now another live process is removed | `test_stale_work_dir_of_a_reused_pid_is_removed` |
| `load_tokenizer`, `read_meta`, `read_text` on random bytes and truncations: a result or `LMBasicsError`, nothing else | `test_*_on_random_bytes`, `test_*_truncated` |
"""
from __future__ import annotations
import json, os, random, signal, string, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from lm_basics.core import LMBasicsError
from lm_basics.tokenize import EOT, load_tokenizer, read_meta, read_text, train_bpe

PREPARED = ['meta.json', 'tokenizer.json', 'train.npy', 'val.npy']


@pytest.fixture(scope='module')
def text_file(tmp_path_factory) -> Path:
    "About 60 KB of four plays, as four documents."
    from lm_basics.data import shakespeare_plays
    plays = shakespeare_plays()
    f = tmp_path_factory.mktemp('text')/'plays.txt'
    f.write_text(EOT.join(plays[n][:15_000] for n in ['hamlet', 'macbeth', 'othello', 'king-lear']))
    return f


def random_letters(path:Path, n:int) -> Path:
    "`n` random ASCII letters without a space: one long 'word' after another, none repeated."
    path.write_text(''.join(random.Random(0).choices(string.ascii_letters, k=n)))
    return path


def prepare(lm, *args, cwd, **kw):
    return lm.run(*args, '--no-progress', cwd=cwd, script='lm_basics_prepare', **kw)


# ---------------------------------------------------------------------------------------------------- a closed reader
def test_closed_stdout_keeps_the_work(text_file, tmp_path, lm):
    "stdout is a pipe whose reader is gone before the first line: the data is still prepared and published, exit 0, no traceback."
    r, w = os.pipe(); os.close(r)
    try:
        cmd = [*lm.command('lm_basics_prepare'), text_file, '--out', tmp_path/'data', '--vocab_size', 300, '--no-progress']
        p = subprocess.run(list(map(str, cmd)), stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    finally: os.close(w)
    assert p.returncode == 0 and p.stderr == '', p
    assert sorted(f.name for f in (tmp_path/'data').iterdir()) == PREPARED


def test_head_keeps_the_work(text_file, tmp_path, lm):
    "`lm_basics_prepare ... | head -1`: head shows the first line, and the prepare finishes and publishes all the same."
    cmd = ' '.join(map(str, [*lm.command('lm_basics_prepare'), text_file, '--out', tmp_path/'data', '--vocab_size', 300, '--no-progress']))
    p = subprocess.run(['bash', '-c', f'{cmd} | head -1; exit ${{PIPESTATUS[0]}}'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith('Inputs: 1 file(s)') and len(p.stdout.splitlines()) == 1 and p.stderr == '', p
    assert json.loads((tmp_path/'data'/'meta.json').read_text())['vocab_size'] == 300


def test_closed_stdout_and_stderr(text_file, tmp_path, lm):
    "Started with stdout and stderr closed (`>&- 2>&-`, as some daemons start jobs): the data is prepared all the same, exit 0."
    cmd = ' '.join(map(str, [*lm.command('lm_basics_prepare'), text_file, '--out', tmp_path/'data', '--vocab_size', 300]))
    p = subprocess.run(['bash', '-c', f'{cmd} >&- 2>&-'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p
    assert sorted(f.name for f in (tmp_path/'data').iterdir()) == PREPARED


# ---------------------------------------------------------------------------------------------------- absurd numbers
HUGE = str(2**70)
# (flag, value, None if it must work, else what the one error line must say)
NUMBERS = [('vocab_size', '-1', 'vocab_size -1 is too small'), ('vocab_size', '0', '--vocab_size 257 or more'),
           ('vocab_size', str(2**32), '--vocab_size 1048576 or less'), ('vocab_size', HUGE, '--vocab_size 1048576 or less'),
           ('vocab_size', '1e400', 'vocab_size must be int'), ('vocab_size', '1048576', None),
           ('val_fraction', '-1', 'val_fraction must lie'), ('val_fraction', '0', 'val_fraction must lie'),
           ('val_fraction', '1', 'val_fraction must lie'), ('val_fraction', HUGE, 'val_fraction must lie'),
           ('val_fraction', 'nan', 'val_fraction must lie'), ('val_fraction', 'inf', 'val_fraction must lie'),
           ('val_fraction', '1e-300', None),
           ('min_frequency', '-1', '--min_frequency 0 or more'), ('min_frequency', HUGE, '--min_frequency 0 or more'),
           ('min_frequency', '0', None), ('min_frequency', str(10**18), None),
           ('tokenizer_train_bytes', '-5', '--tokenizer_train_bytes 0 or more'), ('tokenizer_train_bytes', '0', None),
           ('tokenizer_train_bytes', '1', None), ('tokenizer_train_bytes', HUGE, None),
           ('tokenizer_distinct_bytes', '-1', '--tokenizer_distinct_bytes 0 or more'), ('tokenizer_distinct_bytes', '0', None),
           ('tokenizer_distinct_bytes', '1', None), ('tokenizer_distinct_bytes', HUGE, None)]

@pytest.fixture(scope='module')
def number_runs(text_file, tmp_path_factory, lm) -> dict:
    "Every case of NUMBERS as a real process (two at a time), in a directory of its own."
    def one(case):
        flag, value, _ = case
        cwd = tmp_path_factory.mktemp(flag)
        return cwd, prepare(lm, text_file, '--out', cwd/'data', '--vocab_size' if flag != 'vocab_size' else '--val_fraction',
                            300 if flag != 'vocab_size' else 0.25, f'--{flag}', value, cwd=cwd, timeout=600)
    return dict(zip(NUMBERS, lm.in_parallel(one, NUMBERS)))

@pytest.mark.parametrize('case', NUMBERS, ids=[f'{f}={"2**70" if v == HUGE else v}' for f, v, _ in NUMBERS])
def test_numeric_flags_work_or_refuse_clearly(case, number_runs):
    "An absurd number is one `error:` line naming the flag's fix (exit 2, nothing created), or it works; never a traceback or a crash."
    cwd, r = number_runs[case]
    if case[2] is None:
        r.ok()
        meta = json.loads((cwd/'data'/'meta.json').read_text())
        assert meta['train_tokens'] > 0 and meta['val_tokens'] > 0
    else:
        r.error(case[2])
        assert not (cwd/'data').exists()


# ---------------------------------------------------------------------------------------------------- stopping
def read_chars(pid:int) -> int:
    "Bytes the process has read so far (`rchar` of /proc/PID/io)."
    return int(next(l for l in Path(f'/proc/{pid}/io').read_text().splitlines() if l.startswith('rchar:')).split()[1])

def test_signal_during_training_stops_at_once(tmp_path, lm):
    """Ctrl-C while the Rust BPE trainer runs (12 MB of random letters, no limit on its training text, 30,000 merges: tens
    of seconds in one call that does not return to Python), once it has read half the text: the process is out within
    seconds, exit 130, and leaves nothing. Before, the signal waited for the
    trainer to return (45 s and more on a busy machine)."""
    if not Path(f'/proc/{os.getpid()}/io').exists(): lm.missing_tool('/proc/PID/io (Linux) to see when the trainer has read its text')
    src = random_letters(tmp_path/'letters.txt', 12_000_000)
    out = tmp_path/'data'
    p = lm.start(src, '--out', out, '--tokenizer_distinct_bytes', 0, '--vocab_size', 30000, '--no-progress', cwd=tmp_path,
                 script='lm_basics_prepare')   # 30,000 merges: training outlasts a busy machine's delays
    p.wait_for(r'^Inputs: ')
    start, deadline = read_chars(p.pid), time.monotonic() + 300
    while read_chars(p.pid) < start + src.stat().st_size // 2:   # the trainer has been fed half the text: it is inside
        assert time.monotonic() < deadline and p.p.poll() is None, p   # the Rust trainer's call, counting words as they come
        time.sleep(0.05)
    assert p.p.poll() is None, p
    t = time.monotonic()
    p.signal(signal.SIGINT)
    r = p.finish()
    took = time.monotonic() - t
    assert r.returncode == 130 and 'Traceback' not in r.stdout + r.stderr, r
    assert r.stderr.strip() == 'Interrupted by SIGINT: stopped; nothing half-written was kept', r
    assert 'Tokenizer:' not in r.stdout, r   # it was stopped during training, not after
    assert took < 15, f"took {took:.1f} s to stop"
    assert not out.exists()
    print(f"stopped {took:.2f} s after SIGINT, during BPE training")

def test_signal_during_encoding_stops_at_once(tmp_path, lm):
    "SIGTERM during the encode pass: out within seconds, exit 143, nothing left."
    from lm_basics.data import shakespeare_plays
    src = tmp_path/'plays.txt'
    src.write_text(EOT.join(shakespeare_plays().values()) * 3)   # about 15 MB: a minute of encoding on a busy machine
    out = tmp_path/'data'
    p = lm.start(src, '--out', out, '--vocab_size', 1000, '--tokenizer_train_bytes', 1_000_000, '--no-progress', cwd=tmp_path,
                 script='lm_basics_prepare')
    p.wait_for(r'^Tokenizer: ')
    time.sleep(1)
    assert p.p.poll() is None, p
    t = time.monotonic()
    p.signal(signal.SIGTERM)
    r = p.finish()
    took = time.monotonic() - t
    assert r.returncode == 143 and r.stderr.strip() == 'Interrupted by SIGTERM: stopped; nothing half-written was kept', r
    assert took < 15, f"took {took:.1f} s to stop"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- pathological text
def test_random_letters_train_in_bounded_memory(tmp_path, lm):
    """20 MB of random letters (no word repeats): the tokenizer trains on the prefix whose distinct words hold 4 MB and says so;
    the whole command stays under 1.5 GB (it took 2.7 GB and 70 s of training before) and is lossless."""
    src = random_letters(tmp_path/'letters.txt', 20_000_000)
    out = tmp_path/'data'
    cmd = [*lm.command('lm_basics_prepare'), src, '--out', out, '--no-progress']
    p = subprocess.run(['/usr/bin/time', '-f', 'maxrss_kb=%M', *map(str, cmd)], capture_output=True, text=True, timeout=900) \
        if Path('/usr/bin/time').exists() else None
    if p is None: lm.missing_tool('/usr/bin/time (GNU time) to measure the peak memory')
    assert p.returncode == 0, p
    assert 'where its distinct words reached 4,000,000 bytes (--tokenizer_distinct_bytes' in p.stdout, p.stdout
    rss_mb = int(p.stderr.split('maxrss_kb=')[1].split()[0]) / 1024
    print(p.stdout, f"peak RSS {rss_mb:.0f} MiB")
    assert rss_mb < 1500, f"peak RSS {rss_mb:.0f} MiB"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out/'tokenizer.json'))
    ids = np.concatenate([np.load(out/'train.npy'), np.load(out/'val.npy')])
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == src.read_text() + EOT


# ---------------------------------------------------------------------------------------------------- inputs
def test_growing_input_is_refused(tmp_path, lm):
    "A file appended to while it is prepared (a download or a log still being written): one clear error, nothing published."
    from lm_basics.data import shakespeare_plays
    src = tmp_path/'growing.txt'
    text = EOT.join(shakespeare_plays().values())
    src.write_text(text)
    out = tmp_path/'data'
    p = lm.start(src, '--out', out, '--vocab_size', 2000, '--no-progress', cwd=tmp_path, script='lm_basics_prepare')
    p.wait_for(r'^Inputs: ')   # the scan is done: the text it counted is no longer the text
    with open(src, 'a') as f: f.write(EOT + text[:100_000])
    r = p.finish()
    r.error(f'input {src} changed while lm_basics_prepare was reading it', 'its size went from', 'nothing was written')
    assert not out.exists()

@pytest.mark.parametrize('what', ['input', 'work dir', 'tokenizer'])
def test_removed_underneath(what, tmp_path, lm):
    """The input deleted, the temporary directory removed by someone else, or the --tokenizer replaced, while a prepare runs:
    one clear error that says which (not "cannot read ...; check its permissions", not a FileNotFoundError traceback, not
    token files that the tokenizer.json beside them did not make), nothing left."""
    from lm_basics.data import shakespeare_plays
    import shutil
    src, out = tmp_path/'plays.txt', tmp_path/'data'
    src.write_text(EOT.join(shakespeare_plays().values()))
    tok = tmp_path/'tokenizer.json'
    train_bpe([src.read_text()[:100_000]], vocab_size=500).save(str(tok))
    how = ['--tokenizer', tok] if what == 'tokenizer' else ['--vocab_size', 2000]
    p = lm.start(src, '--out', out, *how, '--no-progress', cwd=tmp_path, script='lm_basics_prepare')
    p.wait_for(r'^Inputs: ')   # seconds of training or encoding are ahead
    if what == 'input': src.unlink()
    elif what == 'work dir': [shutil.rmtree(d) for d in out.glob('.prepare-*')]
    else: train_bpe([src.read_text()[:50_000]], vocab_size=400).save(str(tok.with_name('other.json'))); os.replace(tok.with_name('other.json'), tok)
    r = p.finish()
    if what == 'input': r.error(f'input {src} changed while lm_basics_prepare was reading it', 'cannot be found any more')
    elif what == 'work dir': r.error(f'cannot write the prepared data in {out}', 'No such file or directory', 'make sure nothing else')
    else: r.error(f'input {tok} changed while lm_basics_prepare was reading it', 'replaced by another file')
    assert not out.exists()

def test_inputs_that_are_not_regular_files(tmp_path, lm):
    "/dev/zero and a FIFO are named as what they are, with the fix; nobody waits on the FIFO; nothing is created."
    fifo = tmp_path/'stream.txt'; os.mkfifo(fifo)
    for src, kind in [('/dev/zero', 'a character device'), (fifo, 'a FIFO (named pipe)'), (tmp_path, 'a FIFO (named pipe)')]:
        r = prepare(lm, src, '--out', tmp_path/'data', cwd=tmp_path, timeout=60)
        r.error(f'is not a regular file but {kind}', 'save the text to a file first')
        assert not (tmp_path/'data').exists()

def test_stale_work_dir_of_a_reused_pid_is_removed(text_file, tmp_path, lm):
    """A `.prepare-PID` left by a prepare killed outright, whose pid now belongs to a live process that is not a prepare:
    the next prepare into that directory removes it (before, it was kept forever, even with --force)."""
    other = subprocess.Popen(['sleep', '300'])
    try:
        out = tmp_path/'data'
        for force in ([], ['--force']):
            stale = out/f'.prepare-{other.pid}'
            stale.mkdir(parents=True); (stale/'train.npy').write_bytes(b'\0' * 1000)
            prepare(lm, text_file, '--out', out, '--vocab_size', 300, *force, cwd=tmp_path).ok()
            assert sorted(p.name for p in out.iterdir()) == PREPARED
            assert other.poll() is None   # (alive all along: the directory's pid did name a live process)
    finally: other.kill(); other.wait()


# ---------------------------------------------------------------------------------------------------- readers on random bytes
FAST = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp('tok')
    train_bpe(['To be, or not to be, that is the question. ' * 20, EOT], vocab_size=300).save(str(d/'tokenizer.json'))
    return (d/'tokenizer.json').read_bytes()

@pytest.fixture(scope='module')
def meta_json(text_file, tmp_path_factory) -> bytes:
    from lm_basics.tokenize import prepare as prepare_in_process
    out = tmp_path_factory.mktemp('meta')/'data'
    prepare_in_process([str(text_file)], out, vocab_size=300, progress=False, log=False)
    return (out/'meta.json').read_bytes()

def result_or_user_error(fn, data:bytes, tmp_path:Path, name:str):
    "`fn(path)` on a file holding `data`: its result, or None for an `LMBasicsError`; any other exception fails the test."
    p = tmp_path/name; p.write_bytes(data)
    try: return fn(p)
    except LMBasicsError: return None

@FAST
@given(data=st.binary(max_size=2000))
def test_load_tokenizer_on_random_bytes(data, tmp_path):
    result_or_user_error(load_tokenizer, data, tmp_path, 'tokenizer.json')

@FAST
@given(cut=st.integers(0, 10**9), flip=st.integers(0, 10**9), byte=st.integers(0, 255))
def test_load_tokenizer_truncated_or_damaged(cut, flip, byte, tokenizer_json, tmp_path):
    data = bytearray(tokenizer_json[:cut % (len(tokenizer_json) + 1)])
    if data and flip % 2: data[flip % len(data)] = byte   # half the cases also have one byte changed
    tok = result_or_user_error(load_tokenizer, bytes(data), tmp_path, 'tokenizer.json')
    if tok is not None: tok.decode(tok.encode('To be, or not').ids)

@FAST
@given(data=st.binary(max_size=2000))
def test_read_meta_on_random_bytes(data, tmp_path):
    meta = result_or_user_error(read_meta, data, tmp_path, 'meta.json')
    assert meta is None or isinstance(meta, dict)

@FAST
@given(cut=st.integers(0, 10**9), flip=st.integers(0, 10**9), byte=st.integers(0, 255))
def test_read_meta_truncated_or_damaged(cut, flip, byte, meta_json, tmp_path):
    data = bytearray(meta_json[:cut % (len(meta_json) + 1)])
    if data and flip % 2: data[flip % len(data)] = byte
    meta = result_or_user_error(read_meta, bytes(data), tmp_path, 'meta.json')
    assert meta is None or isinstance(meta, dict) and (not isinstance(meta.get('vocab_size'), bool))

@FAST
@given(data=st.binary(max_size=5000), block=st.integers(1, 64))
def test_read_text_on_random_bytes(data, block, tmp_path):
    text = result_or_user_error(lambda p: ''.join(read_text(p, block_bytes=block)), data, tmp_path, 't.txt')
    if text is not None: assert text.encode('utf-8') == data   # what it gives back is exactly the file
