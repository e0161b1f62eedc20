"""Settings and token files as a hostile user gives them: every reader of a file a user names (`load_config_file`,
`open_tokens`, `load_tokens`) and every number of `TrainConfig` is driven with random and absurd input by `hypothesis`,
in-process; each must give a valid result or an `LMBasicsError` (one clear line at the command line), never another
exception. The examples are derandomized, so CI never flakes, and few enough to take seconds.

Also here, the fixes that are not errors and so not rows of test_bad_input.py: `~` in a path setting expanded, a `.NPY`
suffix read as `.npy`, a damaged built-in dataset prepared again, the help of `--compile`, and every documented command
line still parsing with the new checks."""
from __future__ import annotations
import json, math, os, shlex, shutil, struct
from pathlib import Path
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lm_basics.core import LMBasicsError, _base_type
from lm_basics.config import (TrainConfig, TYPES, FIELDS, ALIASES, HELP, validate, resolve_accumulation, load_config_file,
                              parse_config, merge_resumed_config)
from lm_basics.data import open_tokens, load_tokens, INT_DTYPES, NPY_MAGIC

FAST = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

@pytest.fixture(scope='module')
def scratch(tmp_path_factory) -> Path: return tmp_path_factory.mktemp('hostile')


# ---------------------------------------------------------------------------------------------------- numbers
NUMERIC = [k for k, t in TYPES.items() if _base_type(t) in (int, float)]
ABSURD = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**31 - 1, 2**32, 2**40, 2**62, 2**63, 2**63 - 1, 2**64, 2**70, 10**400, -2**63]),
                   st.integers(), st.integers(-2**80, 2**80),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324, 2.0, 1.5]))

@FAST
@given(over=st.dictionaries(st.sampled_from(NUMERIC), ABSURD, min_size=1, max_size=4), world=st.integers(1, 1 << 20),
       accumulate=st.booleans())
def test_every_number_validates_or_is_refused(over, world, accumulate):
    "Any numbers in any numeric settings: `validate` then `resolve_accumulation` accept them, or raise LMBasicsError."
    if accumulate: over.setdefault('total_batch_size', over.get('batch_size', 64) * 256 * world * 3)
    try: cfg = validate(TrainConfig(**over))
    except LMBasicsError: return
    try: accum = resolve_accumulation(cfg, world, set(over))
    except LMBasicsError: return
    assert 1 <= accum <= 2**16 and accum * cfg.batch_size <= 2**24, (over, accum)   # what reaches the trainer fits

@pytest.mark.parametrize('setting, value, needle', [
    ('total_batch_size', 2**70, 'total_batch_size 1,180,591,620,717,411,303,424 is too large'),
    ('total_batch_size', 2**40, 'would take 67,108,864 micro-steps'),
    ('total_batch_size', 2**31, 'would take 131,072 micro-steps'),
    ('gradient_accumulation_steps', 16777216, 'gradient_accumulation_steps 16,777,216 is too large (at most 65,536'),
    ('eval_iters', 2**31, 'eval_iters 2,147,483,648 is too large (at most 65,536'),
    ('sample_tokens', 2**40, 'sample_tokens 1,099,511,627,776 is too large'),
    ('max_iters', 2**63, 'max_iters 9,223,372,036,854,775,808 is too large'),
    ('lr', 10**400, 'lr 1000'),
])
def test_absurd_numbers_are_refused_naming_the_setting(setting, value, needle):
    with pytest.raises(LMBasicsError, match=None) as e:
        resolve_accumulation(validate(TrainConfig(**{setting: value})))
    assert needle in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------- config files
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**500, 10**500), st.floats(), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
KEYS = st.sampled_from(sorted(FIELDS) + sorted(ALIASES) + [k.replace('_', '-') for k in FIELDS])

def read_config(path:Path, text:bytes|str):
    "`load_config_file` on `text`; a result must also build a TrainConfig that validates or is refused."
    path.write_bytes(text if isinstance(text, bytes) else text.encode('utf-8', 'surrogatepass'))
    try: out = load_config_file(path)
    except LMBasicsError as e:
        assert '\n' not in str(e) and len(str(e)) < 1000, str(e)   # one readable line
        return
    assert isinstance(out, dict) and set(out) <= set(FIELDS)
    try: validate(TrainConfig(**out))
    except LMBasicsError: pass

@FAST
@given(data=st.binary(max_size=400))
def test_config_file_of_random_bytes(data, scratch):
    read_config(scratch/'bytes.json', data)

@FAST
@given(value=JSON_VALUE)
def test_config_file_of_random_json(value, scratch):
    read_config(scratch/'any.json', json.dumps(value))

@FAST
@given(obj=st.dictionaries(KEYS, JSON_VALUE, max_size=6))
def test_config_file_of_random_settings(obj, scratch):
    read_config(scratch/'settings.json', json.dumps(obj))

@pytest.mark.parametrize('text, needle', [
    ('{"a":' * 100_000 + '1' + '}' * 100_000, 'too deeply'),
    ('[' * 100_000, 'too deeply'),
    ('{"d_model": 1,', 'not valid JSON'),
    ('{"lr": 1' + '0' * 400 + '}', 'too large for a number'),
    ('{"seed": 1' + '0' * 5000 + '}', 'cannot read'),
    ('{' + ', '.join(f'"k{i}": 1' for i in range(100_000)) + '}', 'too large for a file of settings'),
    ('{"' + 'x' * 5000 + '": 1}', "unknown key 'xxxx"),
    ('{"d_model": [' + ', '.join(['1'] * 100_000) + ']}', 'd_model'),
])
def test_hostile_config_files_get_one_short_line(tmp_path, text, needle):
    p = tmp_path/'c.json'; p.write_text(text)
    with pytest.raises(LMBasicsError) as e: load_config_file(p)
    assert needle in str(e.value) and len(str(e.value)) < 600, str(e.value)[:2000]


# ---------------------------------------------------------------------------------------------------- contradictions and paths
def test_a_default_is_never_a_contradiction():
    "Settings left at their defaults (or a resumed run's stored config, holding every field) contradict nothing."
    cfg, _ = parse_config([])
    saved = dict(vars(TrainConfig(decay_frac=0.3, muon_lr=0.01, dataset='shakespeare_bytes', train_data_path='a', val_data_path='b')))
    merged, _ = merge_resumed_config(TrainConfig(max_iters=50), {'max_iters'}, saved)   # an old run that had them: still loads
    assert (merged.decay_frac, merged.muon_lr, merged.max_iters) == (0.3, 0.01, 50)
    merged, _ = merge_resumed_config(TrainConfig(dataset='shakespeare_bytes'), set(FIELDS), saved)   # the API: every setting explicit
    assert merged.dataset == 'shakespeare_bytes'

def test_resumed_contradictions_wait_for_the_checkpoint():
    "With --resume, a Muon setting is fine if the checkpoint's optimizer is Muon, refused if it is not."
    cfg, explicit = parse_config(['--resume', 'auto', '--muon_lr', '0.01', '--max_iters', '50'])
    assert merge_resumed_config(cfg, explicit, dict(vars(TrainConfig(optimizer='muon'))))[0].muon_lr == 0.01
    with pytest.raises(LMBasicsError, match="optimizer .from ck.pt. = 'adamw'"):
        merge_resumed_config(cfg, explicit, dict(vars(TrainConfig())), source='ck.pt')
    with pytest.raises(LMBasicsError, match='--dataset is given, but train_data_path .from ck.pt.'):
        cfg, explicit = parse_config(['--resume', 'auto', '--dataset', 'shakespeare_bytes'])
        merge_resumed_config(cfg, explicit, dict(vars(TrainConfig(train_data_path='a.npy', val_data_path='b.npy'))), source='ck.pt')

def test_tilde_is_expanded_in_every_path_setting(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path/'home')); (tmp_path/'home').mkdir()
    p = tmp_path/'c.json'
    p.write_text(json.dumps(dict(train_data='~/d/train.npy', val_data_path='~/d/val.npy', checkpoint_dir='~/runs/x', resume='~/runs/x/ck.pt')))
    home = tmp_path/'home'
    for cfg in (parse_config(['--config', '~/../c.json'])[0],
                parse_config([f'--train_data_path=~/d/train.npy', '--val_data=~/d/val.npy', '--checkpoint-dir=~/runs/x', '--resume=~/runs/x/ck.pt'])[0]):
        assert (cfg.train_data_path, cfg.val_data_path, cfg.checkpoint_dir, cfg.resume_from) == \
               (f'{home}/d/train.npy', f'{home}/d/val.npy', f'{home}/runs/x', f'{home}/runs/x/ck.pt'), cfg
    assert parse_config(['--resume', 'auto'])[0].resume_from == 'auto'

def test_tilde_in_a_config_file_trains_in_the_home_directory(tmp_path, corpus, lm):
    "A real run: `~/runs/x` in a config file is $HOME/runs/x, and no directory named `~` appears where it runs."
    home, cwd = tmp_path/'home', tmp_path/'cwd'; home.mkdir(); cwd.mkdir()
    (cwd/'c.json').write_text(json.dumps({'checkpoint_dir': '~/runs/x'}))
    run = lm.run('--config', 'c.json', '--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'),
                 *lm.tiny_flags(vocab_size=256, max_iters=2, warmup_iters=0, eval_interval=2, checkpoint_interval=2),
                 '--no-plot', cwd=cwd, env={'HOME': str(home)}).ok()
    assert (home/'runs'/'x'/'checkpoint_iter_2.pt').is_file(), run
    assert not any(p.name.startswith('~') for p in cwd.rglob('*')), sorted(cwd.rglob('*'))

def test_every_documented_command_line_parses():
    "Each command line of the two documents, verbatim (module path aside), passes the new checks of the settings."
    import test_cli_spec as spec
    from lm_basics.config import check_given
    root = Path(__file__).resolve().parents[1]
    for name in ('EN_BASIC', 'EN_FULL', 'EN_RESUME', 'EN_QUICK', 'EN_PRODUCTION', 'ZH_CONFIG_SMALL', 'ZH_CONFIG_GPT2', 'ZH_FLAGS',
                 'ZH_RESUME', 'ZH_WANDB'):
        args = [str(root/a) if a.startswith('configs/') else a for a in spec.spec_args(getattr(spec, name))]
        cfg, explicit = parse_config(args)
        if cfg.resume_from is None: validate(cfg)
        else: validate(merge_resumed_config(cfg, explicit, dict(vars(cfg)))[0])   # resuming a run made with these settings


# ---------------------------------------------------------------------------------------------------- token files
def npy_bytes(ids:np.ndarray) -> bytes:
    import io
    f = io.BytesIO(); np.save(f, ids); return f.getvalue()

def npy_with_header(fields:str, body:bytes=b'', version:int=1) -> bytes:
    "A .npy file whose header dict is `fields` as written (any text)."
    h = fields.encode('latin1', 'replace')
    h += b' ' * (-(len(h) + 1 + (10 if version == 1 else 12)) % 64) + b'\n'
    size = struct.pack('<H', len(h)) if version == 1 else struct.pack('<I', len(h))
    return NPY_MAGIC + bytes([version, 0]) + size + h + body

HEADERS = st.builds(
    lambda descr, fortran, shape, extra: f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, {extra}}}",
    st.sampled_from(['<u2', '>u2', '|u1', '<u4', '<i8', '>i4', '<f4', '|O', '|b1', '|V8', '<U3', '<M8[s]', "[('a', '<u2')]", 'u2', 'xx', '']),
    st.sampled_from(['False', 'True', '0', 'None']),
    st.one_of(st.sampled_from([(-1,), (0,), (2**63,), (True,)]), st.tuples(st.integers(-5, 2**66)), st.tuples(st.integers(0, 9), st.integers(0, 9)), st.just(()),
              st.text(max_size=10)),
    st.sampled_from(['', "'x': 1,", '(((((']))

def token_file(path:Path, data:bytes, dtype:str, vocab:int):
    "Open and load a token file of `data` bytes: a memmap that reads end to end, or LMBasicsError."
    path.write_bytes(data)
    try: t = open_tokens(path, dtype)
    except LMBasicsError: return
    assert t.ndim == 1 and len(t) >= 1 and np.issubdtype(t.dtype, np.integer)
    np.asarray(t[:]).sum()   # every mapped byte is there: no SIGBUS
    try: load_tokens(path, vocab, 4, dtype)
    except LMBasicsError: pass

SUFFIXES = st.sampled_from(['.npy', '.NPY', '.bin', '.ids', '.txt', ''])

@FAST
@given(data=st.one_of(st.binary(max_size=600), st.binary(max_size=300).map(lambda b: NPY_MAGIC + b),
                      st.binary(max_size=200).map(lambda b: b'PK\x03\x04' + b)),
       suffix=SUFFIXES, dtype=st.sampled_from(INT_DTYPES))
def test_token_file_of_random_bytes(data, suffix, dtype, scratch):
    token_file(scratch/f'rand{suffix}', data, dtype, 256)

@FAST
@given(header=HEADERS, body=st.binary(max_size=64), version=st.sampled_from([1, 2, 3]), suffix=st.sampled_from(['.npy', '.Npy']))
def test_npy_token_file_with_any_header(header, body, version, suffix, scratch):
    token_file(scratch/f'hdr{suffix}', npy_with_header(header, body, version), 'uint16', 256)

VALID = {f'{dt}{sfx}': (npy_bytes(np.arange(300, dtype=dt) % 250) if sfx == '.npy' else (np.arange(300) % 250).astype(dt).tobytes(), dt)
         for dt in ('uint16', '>u4', 'int64', 'uint8') for sfx in ('.npy', '.bin')}

@FAST
@given(name=st.sampled_from(sorted(VALID)), cut=st.integers(0, 3000), flip=st.one_of(st.none(), st.tuples(st.integers(0, 200), st.integers(0, 255))))
def test_truncated_or_damaged_valid_token_file(name, cut, flip, scratch):
    data, dt = VALID[name]
    data = bytearray(data[:cut])
    if flip and flip[0] < len(data): data[flip[0]] = flip[1]
    token_file(scratch/f'valid_{name}', bytes(data), 'uint16' if dt.startswith('>') else dt, 256)

def test_upper_case_npy_suffix_is_a_npy_file(tmp_path, corpus):
    "A `.NPY` file is read by its header, not as raw uint16 (which trained on the header and gave ids in the millions)."
    p = Path(shutil.copy(corpus.path('val', 'npy'), tmp_path/'VAL.NPY'))
    t = load_tokens(p, 256, 32)
    assert np.array_equal(np.asarray(t), np.load(corpus.path('val', 'npy')))


# ---------------------------------------------------------------------------------------------------- the built-in dataset
def test_truncated_builtin_dataset_is_prepared_again(tmp_path, lm):
    "A real run on a cache whose train.npy was cut short prepares it again (nobody else is using it) and trains."
    env = {'LM_BASICS_CACHE': str(tmp_path/'cache')}
    flags = ['--dataset', 'shakespeare_bytes', *lm.tiny_flags(vocab_size=256, max_iters=2, warmup_iters=0, eval_interval=2,
                                                                checkpoint_interval=2), '--no-plot']
    lm.run(*flags, '--checkpoint_dir', 'a', cwd=tmp_path, env=env).ok()
    train = tmp_path/'cache'/'shakespeare_bytes'/'train.npy'
    good = train.read_bytes(); train.write_bytes(good[:len(good) // 3])
    run = lm.run(*flags, '--checkpoint_dir', 'b', cwd=tmp_path, env=env).ok()
    assert train.read_bytes() == good and (tmp_path/'b'/'checkpoint_iter_2.pt').is_file(), run


# ---------------------------------------------------------------------------------------------------- --help
def test_compile_help_says_what_runs_do():
    "Unset, compiling is decided by timing a step, on every device (`resolve_compile`): the help says so, not 'on for CUDA'."
    from lm_basics.runtime import resolve_compile
    assert resolve_compile(None, 1.0, 10**6, 2)[0] and not resolve_compile(None, 1e-3, 10, 2)[0]   # no device in sight
    assert 'CUDA' not in HELP['compile'] and 'timing' in HELP['compile'], HELP['compile']
