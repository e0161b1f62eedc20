"""`lm_basics_export` end to end, through the console scripts: models trained for a few steps by `lm_basics_train` are
exported, loaded by transformers from the exported directory alone (offline), and must give lm_basics' logits, greedy
continuations and token ids.

Two trained models cover the cases: `bytes` (built-in byte-level data, tied embeddings, 2 layers, d_model 48 with 2 heads
of 24 features) and `bpe` (a BPE tokenizer made by `lm_basics_prepare` from Shakespeare, untied embeddings, d_model 32 with
4 query heads of 8 sharing 2 key/value heads: grouped-query attention). Neither head count is d_model/64 (the usual head size of 64), so the per-head RoPE reordering is
exercised with two other head sizes.
"""
from __future__ import annotations
import contextlib, io, json, os, re, sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CONTEXT = 48   # prompt + 30 generated tokens stay inside the context, where lm_basics and transformers see the same tokens
ITERS, BATCH = 150, 8
PASSAGE_PLAY, PASSAGE = 'hamlet', slice(30000, 31500)


def cli(lm, script:str, *args, cwd) -> 'Run':
    "Run the console script `script` (lm_basics_export, lm_basics_generate, lm_basics_prepare) to the end with the suite's runner."
    return lm.start(*args, cwd=cwd, script=script).finish()


pytestmark = pytest.mark.usefixtures('hf_offline')   # transformers reads the exported directories only

@pytest.fixture(scope='module')
def tf(hf_offline):
    "transformers, imported once for the module, without progress bars."
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers

@pytest.fixture(scope='module')
def plays():
    from lm_basics.data import shakespeare_plays
    return shakespeare_plays()


@dataclass
class Model:
    "A trained run, its export, and what lm_basics makes of it."
    name: str
    cwd: Path        # where training ran (data paths in the checkpoint are relative to it)
    run: Path        # the run directory (checkpoint_dir)
    out: Path        # the exported directory
    codec: object    # lm_basics' tokenizer of the run
    model: object = None
    config: dict = None

@pytest.fixture(scope='module')
def models(tmp_path_factory, lm, plays) -> dict:
    "The two trained models, each exported (the BPE run from another directory); the tests below check the exports."
    from lm_basics.generate import ByteCodec, HFCodec, load_model
    from lm_basics.tokenize import load_tokenizer
    ws = tmp_path_factory.mktemp('export')
    # long enough (150 steps, a second or two) for greedy decoding to produce more than one repeated token
    common = ['--no-plot', '--lr', '1e-2', '--min_lr', '1e-3', '--seed', '0']
    steps = dict(context_length=CONTEXT, max_iters=ITERS, batch_size=BATCH, warmup_iters=10, log_interval=50,
                 eval_interval=ITERS, checkpoint_interval=ITERS)
    lm.run(*lm.tiny_flags(d_model=48, num_heads=2, num_layers=2, **steps),
           '--dataset', 'shakespeare_bytes', '--vocab_size', 256, '--tie_embeddings', '--checkpoint_dir', 'bytes_run', *common, cwd=ws).ok()
    (ws/'text').mkdir()
    for name in ('hamlet', 'macbeth'): (ws/'text'/f'{name}.txt').write_text(plays[name][:60000], encoding='utf-8')
    cli(lm, 'lm_basics_prepare', 'text', '--out', 'data', '--vocab_size', 300, '--no-progress', cwd=ws).ok()
    V = json.loads((ws/'data'/'meta.json').read_text())['vocab_size']
    lm.run(*lm.tiny_flags(d_model=32, num_heads=4, num_kv_heads=2, num_layers=1, **steps),   # grouped-query attention
           '--train_data_path', 'data/train.npy', '--val_data_path', 'data/val.npy', '--vocab_size', V,
           '--checkpoint_dir', 'bpe_run', *common, cwd=ws).ok()
    (ws/'elsewhere').mkdir()
    found = {'bytes': Model('bytes', ws, ws/'bytes_run', ws/'hf'/'bytes', ByteCodec()),
             'bpe': Model('bpe', ws, ws/'bpe_run', ws/'hf'/'bpe', HFCodec(load_tokenizer(ws/'data'/'tokenizer.json'), 'bpe'))}
    cli(lm, 'lm_basics_export', '--checkpoint', found['bytes'].run, '--out', found['bytes'].out, '--no-verify', cwd=ws).ok()
    # from another directory: the relative data path is looked up from where training ran; transformers checks it below
    cli(lm, 'lm_basics_export', '--checkpoint', found['bpe'].run, '--out', found['bpe'].out, '--no-verify', cwd=ws/'elsewhere').ok()
    for m in found.values(): m.model, m.config = load_model(m.run, 'cpu')
    return found


@pytest.mark.parametrize('name', ['bytes', 'bpe'])
def test_logits_match(models, tf, name):
    "transformers' logits on random ids of the full context length are lm_basics' within 1e-4 (float32)."
    m = models[name]
    cfg = json.loads((m.out/'config.json').read_text())
    d, nh = m.config['d_model'], m.config['num_heads']
    assert (cfg['architectures'], cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['head_dim']) == \
           (['LlamaForCausalLM'], d, nh, {'bytes': nh, 'bpe': 2}[name], d // nh)   # the BPE model shares 2 key/value heads
    assert cfg['tie_word_embeddings'] == m.config['tie_embeddings'] == (name == 'bytes')
    assert (cfg['max_position_embeddings'], cfg['vocab_size'], cfg['rms_norm_eps'], cfg['hidden_act']) == (CONTEXT, m.config['vocab_size'], 1e-5, 'silu')
    from safetensors import safe_open
    with safe_open(str(m.out/'model.safetensors'), 'pt') as f: keys = set(f.keys())
    assert ('lm_head.weight' in keys) == (name == 'bpe')
    hf = tf.AutoModelForCausalLM.from_pretrained(m.out, local_files_only=True).eval()
    assert type(hf).__name__ == 'LlamaForCausalLM' and next(hf.parameters()).dtype == torch.float32
    ids = torch.randint(m.config['vocab_size'], (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): ours, theirs = m.model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, CONTEXT, m.config['vocab_size'])
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff
    assert ours.std() > 0.05   # trained logits, not a constant that any mapping would reproduce


def greedy_transformers(hf, prompt:list[int], eos:int|None) -> list[int]:
    "transformers' greedy continuation of `prompt` (30 tokens), up to the end-of-text token (not included)."
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos is not None and eos in out else out

@pytest.mark.parametrize('name', ['bytes', 'bpe'])
def test_greedy_generation_matches(models, tf, name):
    "Greedy generation of 30 tokens gives the same tokens in transformers as lm_basics' `generate` at temperature 0."
    from lm_basics.generate import generate, Sampling
    m = models[name]
    hf = tf.AutoModelForCausalLM.from_pretrained(m.out, local_files_only=True).eval()
    prompt = m.codec.encode('ROMEO.\nO, she')
    assert len(prompt) + 30 <= CONTEXT
    ours = list(generate(m.model, prompt, 30, Sampling(temperature=0, top_k=None), eot_id=m.codec.eot_id))
    assert greedy_transformers(hf, prompt, m.codec.eot_id) == ours
    assert len(set(ours)) > 1, ours   # not a degenerate repeat of one token


def test_generate_cli_matches_transformers(models, tf, lm):
    "`lm_basics_generate --temperature 0` prints what transformers' greedy tokens decode to."
    from lm_basics.generate import TextStream
    m = models['bpe']
    prompt = 'HAMLET.\nTo be, or not'
    r = cli(lm, 'lm_basics_generate', '--checkpoint', m.run, '--prompt', prompt, '--temperature', 0, '--max_new_tokens', 30,
            '--no-echo', '--device', 'cpu', cwd=m.cwd).ok()
    hf = tf.AutoModelForCausalLM.from_pretrained(m.out, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(m.out, local_files_only=True)
    ids = greedy_transformers(hf, tok(prompt)['input_ids'], tok.eos_token_id)
    stream = TextStream(tok.decode)   # rendered as the CLI renders tokens: whole characters as they complete
    text = ''.join(stream.put(i) for i in ids) + stream.flush()
    assert len(text) > 0
    assert r.stdout == text + ('' if text.endswith('\n') else '\n'), (r, text)


@pytest.mark.parametrize('name', ['bytes', 'bpe'])
def test_tokenizer_matches(models, tf, plays, name):
    "The exported tokenizer (AutoTokenizer) encodes and decodes a Shakespeare passage to lm_basics' ids and back."
    m = models[name]
    tok = tf.AutoTokenizer.from_pretrained(m.out, local_files_only=True)
    passage = plays[PASSAGE_PLAY][PASSAGE] + '\n  Naïve “quotes” — and an emoji 😀\n'
    want = m.codec.encode(passage)
    assert len(want) > 500
    assert tok(passage)['input_ids'] == want
    assert tok.decode(want) == m.codec.decode(want) == passage
    if name == 'bpe':
        assert (tok.eos_token, tok.bos_token, tok.eos_token_id) == ('<|endoftext|>', '<|endoftext|>', m.codec.eot_id)
        assert tok('a<|endoftext|>b')['input_ids'] == m.codec.encode('a<|endoftext|>b')
        assert json.loads((m.out/'generation_config.json').read_text())['eos_token_id'] == m.codec.eot_id
    else:
        assert len(tok) == 256 and tok.eos_token is None
        assert tok.decode([104, 0xC3, 0xF0, 0x9F, 0x98, 65]) == m.codec.decode([104, 0xC3, 0xF0, 0x9F, 0x98, 65])   # broken UTF-8


def test_bfloat16_sharded_export_replaces_with_force(models, tf, capsys):
    "--dtype bfloat16 writes bfloat16 weights (in shards under a tiny limit), verified, replacing an old export only with --force."
    from lm_basics.export import DTYPES, main
    m, out = models['bytes'], models['bytes'].out.parent/'bf16'
    out.mkdir(); (out/'stale.txt').write_text('an old export')
    # the entry point in this process, which has transformers loaded already: verification (on by default) costs no import
    main(['--checkpoint', str(m.run), '--out', str(out), '--dtype', 'bfloat16', '--max_shard_bytes', '20000', '--force'])
    printed = capsys.readouterr()
    assert 'Verified with transformers' in printed.out and printed.err == '', printed
    assert not (out/'stale.txt').exists() and not list(out.parent.glob('.bf16*'))
    shards = sorted(out.glob('model-*-of-*.safetensors'))
    index = json.loads((out/'model.safetensors.index.json').read_text())
    assert len(shards) > 2 and set(index['weight_map'].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 20000 + 4096 for p in shards[1:])   # the 24 KiB embedding has a shard of its own
    assert json.loads((out/'config.json').read_text())['dtype'] == 'bfloat16'
    hf = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    # in float32, the bfloat16 weights give lm_basics' logits with its weights rounded to bfloat16
    hf32 = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    ref = type(m.model)(**m.model.config).eval()
    ref.load_state_dict({k: v.to(DTYPES['bfloat16']).float() for k, v in m.model.state_dict().items()})
    ids = torch.randint(256, (2, CONTEXT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): assert (hf32(ids).logits - ref(ids)).abs().max() < 1e-4


def test_model_card(models, tf):
    "README.md says what the model is and how it was trained, and its code sample runs."
    import lm_basics
    from lm_basics.checkpoint import read_checkpoint
    from lm_basics.export import find_checkpoint
    from lm_basics.model import count_parameters
    m = models['bpe']
    ck = read_checkpoint(find_checkpoint(m.run))
    card = (m.out/'README.md').read_text()
    ts, final = ck.get('train_state') or {}, (ck.get('train_state') or {}).get('final') or {}
    tokens = ts.get('tokens_seen') or ITERS * BATCH * CONTEXT
    for s in (f"| parameters | {count_parameters(m.model)['total']:,} (", f"| training data | data/train.npy |",
              f"| validation data | data/val.npy |", f"| iterations | {ITERS} |", f"| tokens seen | {tokens:,} |",
              f"| final validation loss | {final['final/val_loss']:.4f} nats per token", f"| best validation loss | {ts['best_val_loss']:.4f}",
              f"| lm_basics version | {lm_basics.__version__} |", '| embeddings | separate from the output layer |',
              '| attention | 4 heads of 8 features', 'lm_basics_train ', '--train_data_path data/train.npy', '--d_model 32'):
        assert s in card, (s, card)
    code = re.search(r'```python\n(.*?)```', card, re.S)[1]
    assert len(code.strip().splitlines()) == 3 and str(m.out) in code
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): exec(code, {})
    assert buf.getvalue().startswith('The ')


def crafted(models, tmp_path, **config) -> Path:
    "A copy of the byte model's checkpoint whose config says `config`."
    from lm_basics.export import find_checkpoint
    ck = torch.load(find_checkpoint(models['bytes'].run), map_location='cpu', weights_only=True)
    ck['config'].update(config)
    p = tmp_path/f"checkpoint_iter_{ck['iteration']}.pt"
    torch.save(ck, p)
    return p

@pytest.mark.parametrize('case', ['not_a_checkpoint', 'out_not_empty', 'relu2', 'qk_norm'])
def test_errors(models, lm, tmp_path, case):
    "What cannot be exported is one `error:` line, exit status 2, no traceback, and no output directory (or an old one untouched)."
    out, ckpt = tmp_path/'out', models['bytes'].run
    if case == 'not_a_checkpoint': (ckpt := tmp_path/'notes.pt').write_text('not a checkpoint\n')
    if case == 'out_not_empty': out.mkdir(); (out/'model.safetensors').write_text('an earlier export')
    if case == 'relu2': ckpt = crafted(models, tmp_path, activation='relu2')
    if case == 'qk_norm': ckpt = crafted(models, tmp_path, qk_norm=True)
    before = lm.snapshot(tmp_path)
    r = cli(lm, 'lm_basics_export', '--checkpoint', ckpt, '--out', out, cwd=tmp_path)
    want = {'not_a_checkpoint': 'not a readable checkpoint', 'out_not_empty': 'already holds files; choose a new directory, or pass --force',
            'relu2': "uses the 'relu2' feed-forward, but a Llama's is SwiGLU", 'qk_norm': 'normalises queries and keys (qk_norm)'}[case]
    r.error(want)   # exit 2, one `error:` line holding `want`, no traceback
    assert r.stdout == '', r
    assert lm.snapshot(tmp_path) == before   # nothing written, nothing left behind, an existing directory untouched


def test_readme_code_runs(models, tf):
    "The README's export command is the one used here, and its three lines of transformers code load and sample from an export."
    readme = (Path(__file__).resolve().parents[1]/'README.md').read_text()
    assert 'lm_basics_export --checkpoint runs/mycorpus --out hf/mycorpus' in readme
    code = next(c for c in re.findall(r'```python\n(.*?)```', readme, re.S) if 'from transformers import' in c)
    assert len(code.strip().splitlines()) == 3
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): exec(code.replace('hf/mycorpus', str(models['bpe'].out)), {})
    assert buf.getvalue().startswith('Once upon a time') and len(buf.getvalue()) > len('Once upon a time') + 10, buf.getvalue()
