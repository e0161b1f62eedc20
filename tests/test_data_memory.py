"""The resident memory of a process that samples thousands of batches from a 1 GiB memory-mapped token file stays
flat, and so does checking every token id of that file (minimal GPT trainers have shipped a leak here: every page a
batch touches stays mapped into the process, so RSS climbs towards the size of the file).

The measurement runs in a fresh subprocess and reads VmRSS / VmHWM from /proc/self/status. A control run in the same
process samples the same file through a plain `np.memmap` without lm_basics, to show the measurement sees the growth
it is meant to catch."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not Path('/proc/self/status').exists(), reason='needs Linux /proc')

GIB = 1 << 30
MIB = 1 << 20

SCRIPT = r'''
import json, sys
import numpy as np, torch
from lm_basics.data import open_tokens, get_batch, check_token_ids

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'): return int(line.split()[1]) * 1024   # bytes
def reset_peak():
    "Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False

def measure(step, n, warmup=200):
    """RSS after warm-up, sampled between calls of `step`, and the peak (VmHWM) after the first tenth and at the end:
    flat means neither the resident set between batches nor the peak keeps climbing."""
    for i in range(warmup): step(i)                    # warm-up: allocator, torch, first pages
    base, can_reset, samples, early_peak = status('VmRSS'), reset_peak(), [], None
    for i in range(n):
        step(i)
        if i % 100 == 0: samples.append(status('VmRSS'))
        if i == n // 10: early_peak = status('VmHWM')
    end = status('VmRSS')
    return dict(base=base, end_growth=end - base, max_growth=max(samples + [end]) - base,
                peak_climb=status('VmHWM') - early_peak if can_reset else max(samples) - samples[len(samples) // 10])

path, n_batches, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {}
data = open_tokens(path)                               # the library's memmap of the file
out['kind'], out['dtype'], out['tokens'] = type(data).__name__, str(data.dtype), len(data)
g = torch.Generator().manual_seed(0)
def batch(i):
    x, y = get_batch(data, B, T, 'cpu', g)
    assert x.shape == (B, T) and x.dtype == torch.int64 and bool((x[:, 1:] == y[:, :-1]).all())
out['get_batch'] = measure(batch, n_batches)

base, can_reset = status('VmRSS'), reset_peak()
out['max_id'] = check_token_ids(data, 256)
out['check_token_ids'] = dict(base=base, end_growth=status('VmRSS') - base,
                              peak_growth=(status('VmHWM') if can_reset else status('VmRSS')) - base)

# control: the same sampling through a plain np.memmap, pages never released
raw = np.memmap(path, dtype=np.uint16, mode='r')
rng = np.random.default_rng(0)
def naive(i):
    starts = rng.integers(0, len(raw) - T - 1, B)
    np.asarray(raw[starts[:, None] + np.arange(T + 1)]).astype(np.int64)
out['control'] = measure(naive, n_batches, warmup=0)
print(json.dumps(out))
'''

@pytest.fixture
def gib_token_file(tmp_path, corpus):
    "A 1 GiB raw uint16 token file: the Shakespeare byte ids, repeated; deleted afterwards."
    text = np.fromfile(corpus.path('train', 'bin'), dtype=np.uint16)
    chunk = np.resize(text, 32 * MIB // 2)                # 32 MiB of tokens, the text over and over
    path = tmp_path/'big.bin'
    try:
        with open(path, 'wb') as f:
            for _ in range(GIB // chunk.nbytes): chunk.tofile(f)
        assert path.stat().st_size == GIB
        yield path, int(text.max())
    finally:
        path.unlink(missing_ok=True)

def test_rss_stays_flat_on_a_1gib_memmap(gib_token_file):
    path, max_id = gib_token_file
    p = subprocess.run([sys.executable, '-c', SCRIPT, str(path), '4000', '64', '256'],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r['kind'] == 'memmap' and r['dtype'] == 'uint16' and r['tokens'] == GIB // 2, r
    mib = {k: {m: round(v / MIB, 1) for m, v in r[k].items()} for k in ('get_batch', 'check_token_ids', 'control')}
    # the measurement sees a leak when there is one: without releasing pages, 4000 batches map hundreds of MiB
    assert r['control']['end_growth'] > 200 * MIB, f"control run did not grow: the measurement is blind\n{mib}"
    # the library's sampling stays flat: between batches, and in its peak (one batch's pages are mapped while it is
    # gathered, then released, so the peak is bounded by a batch and must not climb)
    g = r['get_batch']
    assert g['end_growth'] < 50 * MIB and g['max_growth'] < 50 * MIB and g['peak_climb'] < 50 * MIB, mib
    # streaming every id of the file through the vocabulary check: nothing left behind, the peak bounded by one chunk
    assert r['max_id'] == max_id
    assert r['check_token_ids']['end_growth'] < 50 * MIB, mib
    assert r['check_token_ids']['peak_growth'] < 50 * MIB, mib
