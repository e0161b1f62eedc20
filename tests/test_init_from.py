"""`lm_basics_train --init_from DIR` end to end, on Llamas that `transformers` itself writes (random weights, no network):
imported logit for logit, refused where lm_basics cannot represent them, fine-tuned, resumed, sampled and exported.

The main model, `llama`, is written by `LlamaForCausalLM.save_pretrained`: 4 query heads sharing 2 key/value heads
(grouped-query attention), tied embeddings, with a BPE tokenizer of Shakespeare holding <|endoftext|>; its data is made by
`lm_basics_prepare --tokenizer DIR`. The runs are TINY-sized (the suite's settings, less the architecture, which comes
from the model). Processes are started where the process is the point (flags, exit status, the log, files on disk);
the rest runs in this process.
"""
from __future__ import annotations
import json, re
from pathlib import Path

import pytest
import torch

V = 320   # the BPE's vocabulary (the model's, too)
ARCH = dict(d_model=None, num_heads=None, d_ff=None, num_layers=None)   # left out of the TINY flags: the model has them


pytestmark = pytest.mark.usefixtures('hf_offline')   # transformers reads local directories only

@pytest.fixture(scope='module')
def tf(hf_offline):
    import transformers
    transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
    return transformers

@pytest.fixture(scope='module')
def bpe():
    "A BPE tokenizer of Shakespeare, with <|endoftext|>."
    from lm_basics.data import shakespeare_plays
    from lm_basics.tokenize import train_bpe
    plays = shakespeare_plays()
    return train_bpe([plays['hamlet'][:100_000]], vocab_size=V)

def write_llama(tf, out:Path, bpe, *, seed:int=0, shard:str|None=None, **config) -> Path:
    "A random `LlamaForCausalLM` saved by transformers into `out` with `bpe` as its tokenizer.json; weights nudged off their init."
    arch = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(seed)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**(arch | config)))
    with torch.no_grad():
        for p in m.parameters(): p += 0.1 * torch.randn_like(p)   # norm gains away from 1, logits away from uniform
    m.save_pretrained(out, **({'max_shard_size': shard} if shard else {}))
    bpe.save(str(out/'tokenizer.json'))
    return out

def tensors(d:Path) -> dict:
    "Every tensor of a model directory's safetensors files."
    from safetensors.torch import load_file
    return {k: v for f in sorted(d.glob('*.safetensors')) for k, v in load_file(f).items()}

def same_tensors(a:dict, b:dict):
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a: assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

@pytest.fixture(scope='module')
def ws(tmp_path_factory, lm, tf, bpe) -> Path:
    "The Llama directory `llama` and its data in `data/`, made with lm_basics_prepare --tokenizer llama."
    from lm_basics.data import shakespeare_plays
    d = tmp_path_factory.mktemp('init_from')
    write_llama(tf, d/'llama', bpe)
    (d/'text').mkdir()
    plays = shakespeare_plays()
    for name in ('macbeth', 'othello'): (d/'text'/f'{name}.txt').write_text(plays[name][:40_000], encoding='utf-8')
    r = lm.run('text', '--tokenizer', 'llama', '--out', 'data', '--no-progress', cwd=d, script='lm_basics_prepare').ok()
    assert 'Train with: lm_basics_train --train_data_path data/train.npy --val_data_path data/val.npy --init_from llama' in r.stdout
    assert (d/'data'/'tokenizer.json').read_bytes() == (d/'llama'/'tokenizer.json').read_bytes()
    return d

def flags(lm, **over) -> list:
    "A tiny fine-tuning run from `llama` on `data/` (a later --init_from replaces it: the runner keeps a flag's last value)."
    return ['--init_from', 'llama', '--train_data_path', 'data/train.npy', '--val_data_path', 'data/val.npy', '--no-plot',
            *lm.tiny_flags(**{**ARCH, **over})]


# ---------------------------------------------------------------------------------------------------- importing
@pytest.mark.parametrize('kind', ['gqa_tied', 'mha_untied', 'sharded'])
def test_import_matches_transformers(tmp_path, tf, bpe, kind):
    "Our model from a transformers directory computes transformers' logits (float32), within 1e-5 here; GQA or not, tied or not, sharded or not."
    from lm_basics.pretrained import load_llama, LlamaDir
    config = {'gqa_tied': {}, 'mha_untied': dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=5e5),
              'sharded': dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)}[kind]
    d = write_llama(tf, tmp_path/kind, bpe, seed=1, shard='30KB' if kind == 'sharded' else None, **config)
    assert (len(LlamaDir(d).weight_files) > 1) == (kind == 'sharded')
    model, diff = load_llama(d)
    assert diff < 1e-5, diff
    c = model.config
    assert (c['num_heads'], c['num_kv_heads'], c['tie_embeddings']) == {'gqa_tied': (4, 2, True), 'mha_untied': (4, 4, False),
                                                                        'sharded': (2, 1, False)}[kind]
    hf = tf.AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    ids = torch.tensor([bpe.encode('To be, or not to be, that is the question: whether tis nobler').ids])
    with torch.no_grad(): ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-5 and ours.std() > 0.1

BAD_CONFIGS = {   # a change to config.json -> what the one line says
    'model_type': (dict(model_type='mistral'), "its model_type is 'mistral', not 'llama'"),
    'attention_bias': (dict(attention_bias=True), 'attention_bias is true (biases)'),
    'mlp_bias': (dict(mlp_bias=True), 'mlp_bias is true (biases)'),
    'rope_scaling': (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                        'original_max_position_embeddings': 8192}), "it scales RoPE ('llama3' rope_scaling)"),
    'sliding_window': (dict(sliding_window=16), 'it attends through a sliding window of 16'),
    'head_dim': (dict(head_dim=16), 'its head_dim 16 is not hidden_size / num_attention_heads'),
}

@pytest.mark.parametrize('what', list(BAD_CONFIGS))
def test_unsupported_configs_refused(ws, what):
    "What lm_basics' model cannot represent is refused in one line naming it, before any weight is read."
    import shutil
    from lm_basics.core import LMBasicsError
    from lm_basics.pretrained import LlamaDir
    change, says = BAD_CONFIGS[what]
    d = ws/f'bad_{what}'
    shutil.copytree(ws/'llama', d)
    (d/'config.json').write_text(json.dumps(json.loads((d/'config.json').read_text()) | change))
    with pytest.raises(LMBasicsError) as e: LlamaDir(d)
    assert says in str(e.value) and "which lm_basics' model cannot represent" in str(e.value) and '\n' not in str(e.value)

@pytest.mark.parametrize('what', ['no tokenizer', 'extra tensor', 'missing tensor'])
def test_incomplete_directories_refused(ws, what):
    "A directory without tokenizer.json, or whose weights hold a tensor too many or too few, is one clear error."
    import shutil
    from safetensors.torch import save_file
    from lm_basics.core import LMBasicsError
    from lm_basics.pretrained import load_llama
    d = ws/f'incomplete_{what.replace(" ", "_")}'
    shutil.copytree(ws/'llama', d)
    w = tensors(d)
    if what == 'no tokenizer': (d/'tokenizer.json').unlink(); says = 'has no tokenizer.json'
    elif what == 'extra tensor':
        save_file(w | {'model.layers.0.self_attn.q_proj.bias': torch.zeros(32)}, str(d/'model.safetensors'))
        says = "has weights lm_basics' model has no place for (model.layers.0.self_attn.q_proj.bias)"
    else:
        save_file({k: v for k, v in w.items() if k != 'model.layers.1.mlp.up_proj.weight'}, str(d/'model.safetensors'))
        says = 'has no weight model.layers.1.mlp.up_proj.weight'
    with pytest.raises(LMBasicsError, match=re.escape(says)): load_llama(d)

def test_data_in_another_tokenizer_refused(ws, bpe):
    "Token files made with another tokenizer (or none) than the model's are refused before anything is built."
    import shutil
    from lm_basics.config import parse_config
    from lm_basics.core import LMBasicsError
    from lm_basics.pretrained import init_config
    from lm_basics.tokenize import train_bpe
    other = ws/'other_data'
    shutil.copytree(ws/'data', other)
    train_bpe(['a different tokenizer altogether'] * 5, vocab_size=V).save(str(other/'tokenizer.json'))
    args = ['--init_from', str(ws/'llama'), '--train_data_path', str(other/'train.npy'), '--val_data_path', str(other/'val.npy')]
    with pytest.raises(LMBasicsError, match='was tokenized with .*, not with the tokenizer of'): init_config(*parse_config(args))
    with pytest.raises(LMBasicsError, match="needs token files in the model's vocabulary, not the built-in shakespeare_bytes"):
        init_config(*parse_config(args[:2] + ['--dataset', 'shakespeare_bytes']))


# ---------------------------------------------------------------------------------------------------- the command line
def test_contradicting_flag_and_bad_model_refused(ws, lm):
    "A flag that contradicts the model, or a model lm_basics cannot represent: exit 2, one line naming both values, nothing written."
    import shutil
    shutil.copytree(ws/'llama', ws/'biased')
    (ws/'biased'/'config.json').write_text(json.dumps(json.loads((ws/'llama'/'config.json').read_text()) | {'attention_bias': True}))
    runs = lm.in_parallel(lambda args: lm.run(*args, cwd=ws), [
        flags(lm, d_model=64, checkpoint_dir='refused1'),
        [*flags(lm, checkpoint_dir='refused2'), '--init_from', 'biased']])
    line = runs[0].error('--d_model 64 contradicts the model in llama (hidden_size 32 in its config.json); drop --d_model')
    assert 'Traceback' not in runs[0].stderr and line
    runs[1].error("biased: attention_bias is true (biases), which lm_basics' model cannot represent")
    assert not (ws/'refused1').exists() and not (ws/'refused2').exists()

def eval_losses(log) -> dict:
    return {it: vl for it, tl, vl, ppl in log.evals}

def test_finetune_resume_generate_export(ws, lm, tf):
    """From `llama`: the first evaluation is transformers' loss on the same batches (within 1%), 10 steps, resumed to 20
    without importing again; the run keeps the tokenizer and says where it started; lm_basics_generate's greedy text is
    transformers' on the export; an import of the export, exported again untrained, gives back the same tensors; and an
    export of the untrained import gives back the transformers model's own tensors."""
    from lm_basics.data import load_tokens, get_batch
    first, untrained = lm.in_parallel(lambda args: lm.run(*args, cwd=ws), [
        flags(lm, max_iters=10, checkpoint_dir='run'), flags(lm, max_iters=0, warmup_iters=0, checkpoint_dir='run0')])
    meta = json.loads((ws/'data'/'meta.json').read_text())
    log, _ = lm.check_training_run(first, checkpoint_dir=ws/'run', train_tokens=meta['train_tokens'], val_tokens=meta['val_tokens'],
                                   expect=dict(init_from='llama', num_heads=4, num_kv_heads=2, d_model=32, vocab_size=V))
    m = re.search(r'^Initialised from llama \(([\d,]+) parameters, logits checked against transformers: within (\S+)\)$',
                  first.stdout, re.M)
    assert m and int(m[1].replace(',', '')) == log.count('Total parameters:') and float(m[2]) < 1e-5, first
    assert (ws/'run'/'tokenizer.json').read_bytes() == (ws/'llama'/'tokenizer.json').read_bytes()
    assert json.loads((ws/'run'/'config.json').read_text())['init_from'] == 'llama'

    # iteration 0 is the pretrained model: transformers' mean loss over the evaluator's own batches (seed + 2, val data)
    hf = tf.AutoModelForCausalLM.from_pretrained(ws/'llama', local_files_only=True).eval()
    t = log.table
    val = load_tokens(ws/'data'/'val.npy', V, int(t['context_length']))
    g = torch.Generator().manual_seed(int(t['seed']) + 2)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
                  for x, y in (get_batch(val, int(t['batch_size']), int(t['context_length']), 'cpu', g) for _ in range(int(t['eval_iters'])))]
    assert eval_losses(log)[0] == pytest.approx(sum(losses) / len(losses), rel=0.01)
    assert eval_losses(log)[10] < eval_losses(log)[0]   # it fine-tunes

    # resumed: from its checkpoint, no import; then generation, and the export checked by transformers
    resumed = lm.run('--resume', 'auto', '--checkpoint_dir', 'run', '--max_iters', 20, cwd=ws)
    lm.check_training_run(resumed, checkpoint_dir=ws/'run', train_tokens=meta['train_tokens'], val_tokens=meta['val_tokens'], start=10)
    assert 'Initialised from' not in resumed.stdout and 'Resumed from run/checkpoint_iter_10.pt at iteration 10' in resumed.stdout
    gen, exported, x0 = lm.in_parallel(lambda a: lm.run(*a[1:], cwd=ws, script=a[0]), [
        ('lm_basics_generate', '--checkpoint', 'run', '--prompt', 'MACBETH.', '--max_new_tokens', 20, '--temperature', 0, '--no-echo'),
        ('lm_basics_export', '--checkpoint', 'run', '--out', 'exported'),
        ('lm_basics_export', '--checkpoint', 'run0', '--out', 'x0', '--no-verify')])
    assert 'Verified with transformers' in exported.ok().stdout
    card = (ws/'exported'/'README.md').read_text()
    assert 'fine-tuned from the transformers Llama `llama`' in card and '4 heads of 8 features sharing 2 key/value heads' in card
    same_tensors(tensors(ws/'x0'), tensors(ws/'llama'))          # imported, not trained, exported: transformers' own tensors
    ours = gen.ok().stdout.rstrip('\n')
    tok = tf.AutoTokenizer.from_pretrained(ws/'exported', local_files_only=True)
    hf = tf.AutoModelForCausalLM.from_pretrained(ws/'exported', local_files_only=True).eval()
    x = tok('MACBETH.', return_tensors='pt')['input_ids']
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20)[0, x.shape[1]:].tolist()
    eot = tok.convert_tokens_to_ids('<|endoftext|>')
    assert tok.decode(out[:out.index(eot)] if eot in out else out).rstrip('\n') == ours and len(ours) > 10

    # export -> import -> export: bit-identical
    lm.run(*flags(lm, max_iters=0, warmup_iters=0, checkpoint_dir='run_again'), '--init_from', 'exported', cwd=ws).ok()
    lm.run('--checkpoint', 'run_again', '--out', 'exported_again', '--no-verify', cwd=ws, script='lm_basics_export').ok()
    same_tensors(tensors(ws/'exported_again'), tensors(ws/'exported'))
