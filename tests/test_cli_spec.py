"""Every command line of the two specification documents, run with `lm_basics_train` in place of the module path.

The commands are copied verbatim from the documents (below) and split like a shell would; the CPU-sized settings
(`TINY`) replace the document's values of the same settings (a setting given twice on one command line is refused) and
the rest are appended; each runs in its own workspace whose `data/` holds the token files under the names
the documents use (Shakespeare bytes inside) and whose `configs/` is a copy of the shipped configs. The commands run
two at a time (module fixtures `runs`, then `resumed` for the two that continue a run, on copies), and each test checks
what one of them printed and wrote. How the configuration table is laid out, and how config files and flags are parsed,
is tested in-process by the notebook 08_config; here every table a real run prints is parsed (`lm.check_training_run`).
"""
import json, re, shlex, shutil
import pytest

# ---- the English document (000_e90d6f32c2312726.txt)
EN_BASIC = r"""python -m cs336_basics.training_together \
    --train_data_path data/TinyStoriesV2-GPT4-train.ids \
    --val_data_path data/TinyStoriesV2-GPT4-valid.ids \
    --vocab_size 10000 \
    --max_iters 10000"""
EN_FULL = r"""python -m cs336_basics.training_together \
    --train_data_path data/TinyStoriesV2-GPT4-train.ids \
    --val_data_path data/TinyStoriesV2-GPT4-valid.ids \
    --vocab_size 10000 \
    --context_length 512 \
    --d_model 768 \
    --num_heads 12 \
    --d_ff 3072 \
    --num_layers 12 \
    --lr 3e-4 \
    --min_lr 3e-5 \
    --weight_decay 0.1 \
    --batch_size 32 \
    --max_iters 100000 \
    --checkpoint_dir checkpoints/my_run \
    --use_wandb \
    --wandb_project my-project"""
EN_RESUME = r"""python -m cs336_basics.training_together \
    --train_data_path data/TinyStoriesV2-GPT4-train.ids \
    --val_data_path data/TinyStoriesV2-GPT4-valid.ids \
    --resume_from checkpoints/my_run/checkpoint_iter_5000.pt \
    --max_iters 20000"""
EN_QUICK = r"""python -m cs336_basics.training_together \
    --train_data_path data/TinyStoriesV2-GPT4-train.ids \
    --val_data_path data/TinyStoriesV2-GPT4-valid.ids \
    --vocab_size 10000 \
    --d_model 256 \
    --num_layers 4 \
    --batch_size 32 \
    --max_iters 1000"""
EN_PRODUCTION = r"""python -m cs336_basics.training_together \
    --train_data_path data/TinyStoriesV2-GPT4-train.ids \
    --val_data_path data/TinyStoriesV2-GPT4-valid.ids \
    --vocab_size 10000 \
    --context_length 1024 \
    --d_model 1024 \
    --num_heads 16 \
    --d_ff 4096 \
    --num_layers 24 \
    --lr 2e-4 \
    --min_lr 2e-5 \
    --batch_size 16 \
    --max_iters 200000 \
    --checkpoint_interval 2500 \
    --eval_interval 250 \
    --checkpoint_dir checkpoints/large_model \
    --use_wandb \
    --wandb_project cs336-final \
    --wandb_run_name large-model-v1"""

# ---- the Chinese document (003_ac9fe747ca769bdd.txt)
ZH_CONFIG_SMALL = "uv run python -m cs336_basics.train --config configs/tinystories_small.json"
ZH_CONFIG_GPT2 = "uv run python -m cs336_basics.train --config configs/gpt2_124M.json"
ZH_FLAGS = r"""uv run python -m cs336_basics.train \
  --train-data data/tokenized/tinystories_train.uint16.npy \
  --val-data data/tokenized/tinystories_valid.uint16.npy \
  --vocab-size 10000 \
  --num-layers 6 \
  --d-model 384 \
  --num-heads 6 \
  --batch-size 16 \
  --max-iters 10000"""
ZH_RESUME = r"""uv run python -m cs336_basics.train \
  --config configs/tinystories_small.json \
  --resume checkpoints/tinystories_small/checkpoint_2000.pt"""
ZH_WANDB = r"""uv run python -m cs336_basics.train \
  --config configs/tinystories_small.json \
  --wandb \
  --wandb-project "my-transformers" \
  --wandb-run-name "exp-1-tinystories" \
  --wandb-tags "baseline,tinystories"
"""
ZH_WANDB_CONFIG_KEYS = """{
  "wandb": true,
  "wandb_project": "cs336-transformer",
  "wandb_run_name": "tinystories-small-6L-384d",
  "wandb_tags": "baseline,small"
}"""

def spec_args(cmd:str, **replace) -> list[str]:
    "The arguments of a documented command line (after the module path), with `replace` substituted word for word."
    words = shlex.split(cmd.replace('\\\n', ' '))   # backslash-newline continues the line, as in a shell
    words = words[words.index('-m') + 2:]
    return [replace.get(w, w) for w in words]

@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus, lm) -> dict:
    """Every command of the documents that starts a run, each in its own workspace, two at a time, and `--help`:
    name -> (workspace, Run)."""
    root = tmp_path_factory.mktemp('spec')
    def wandb_in_config(ws):   # method 2 of the Chinese document: the W&B settings written into the config file
        cfg_path = ws/'configs'/'tinystories_small.json'
        cfg = json.loads(cfg_path.read_text()); cfg.update(json.loads(ZH_WANDB_CONFIG_KEYS))
        cfg_path.write_text(json.dumps(cfg, indent=2))
    data = ['--train-data', corpus.path('train', 'npy'), '--val-data', corpus.path('val', 'npy')]
    tiny, kebab = lm.tiny_flags(), lm.tiny_flags(kebab=True)
    cmds = {  # name: (arguments, python -m, edit the workspace first)
        'basic': (lm.merge_flags(spec_args(EN_BASIC) + tiny), False, None),
        'full': (lm.merge_flags(spec_args(EN_FULL) + tiny), False, None),
        'quick': (lm.merge_flags(spec_args(EN_QUICK) + tiny), True, None),
        'production': (lm.merge_flags(spec_args(EN_PRODUCTION) + tiny), False, None),
        'config_small': (lm.merge_flags(spec_args(ZH_CONFIG_SMALL) + kebab), False, None),
        'config_gpt2': (lm.merge_flags(spec_args(ZH_CONFIG_GPT2) + lm.tiny_flags(kebab=True, vocab_size=256, context_length=16,
                                                                                  batch_size=2, dtype=None)), False, None),
        'kebab': (lm.merge_flags(spec_args(ZH_FLAGS) + kebab), False, None),
        'wandb_flags': (lm.merge_flags(spec_args(ZH_WANDB) + kebab + data + ['--checkpoint-dir', root/'elsewhere'/'run']), False, None),
        'wandb_config': (lm.merge_flags(spec_args(ZH_CONFIG_SMALL) + kebab), False, wandb_in_config),
        'help': (['--help'], False, None),
    }
    def one(name):
        args, module, edit = cmds[name]
        ws = lm.make_workspace(root/name, corpus)
        if edit: edit(ws)
        return ws, lm.run(*args, cwd=ws, module=module, env={'COLUMNS': '1000'} if name == 'help' else None)
    out = dict(zip(cmds, lm.in_parallel(one, list(cmds))))
    out['wandb_flags'] = (root/'elsewhere'/'run', *out['wandb_flags'])
    return out


@pytest.fixture(scope='module')
def resumed(runs, tmp_path_factory, corpus, lm) -> dict:
    """The two documented resume commands, each on a copy of the workspace of the run it continues (checkpoint 20 removed,
    as if the run had been stopped after its checkpoint at 10; resuming an older checkpoint where newer ones exist is
    refused: test_run_dir.py), side by side: name -> (workspace, Run)."""
    root = tmp_path_factory.mktemp('resumed')
    en = spec_args(EN_RESUME, **{'checkpoints/my_run/checkpoint_iter_5000.pt': 'checkpoints/my_run/checkpoint_iter_10.pt', '20000': '30'})
    assert en[-4:] == ['--resume_from', 'checkpoints/my_run/checkpoint_iter_10.pt', '--max_iters', '30']
    # the Chinese document names the checkpoint checkpoint_2000.pt; ours are checkpoint_iter_N.pt
    zh = spec_args(ZH_RESUME, **{'checkpoints/tinystories_small/checkpoint_2000.pt': 'checkpoints/tinystories_small/checkpoint_iter_10.pt'})
    zh = lm.merge_flags([*zh, *lm.tiny_flags(kebab=True, max_iters=30), '--train-data', corpus.path('train', 'npy'),
                         '--val-data', corpus.path('val', 'npy')])
    cmds = {'en': ('full', 'checkpoints/my_run', en), 'zh': ('config_small', 'checkpoints/tinystories_small', zh)}
    def one(name):
        src, ckdir, args = cmds[name]
        ws = shutil.copytree(runs[src][0], root/name, symlinks=True)
        first = lm.read_metrics(ws/ckdir)
        (ws/ckdir/'checkpoint_iter_20.pt').unlink()
        return ws, lm.run(*args, cwd=ws), first
    return dict(zip(cmds, lm.in_parallel(one, list(cmds))))


# ---------------------------------------------------------------------------------------------------- English
def test_data_paths_and_max_iters_alone_train_on_the_defaults(lm, runs, corpus):
    "`--train_data_path/--val_data_path/--vocab_size/--max_iters`, everything else from the defaults."
    ws, run = runs['basic']
    log, recs = lm.check_training_run(run, checkpoint_dir=ws/'checkpoints', train_tokens=corpus.n_train,
                                      val_tokens=corpus.n_val, expect=dict(vocab_size=10000, max_iters=20, lr=0.0006,
                                      train_data_path='data/TinyStoriesV2-GPT4-train.ids', checkpoint_dir='checkpoints'))
    # the model learns something in 20 steps: it stops spreading probability over 10000 ids for 256-valued bytes
    assert log.evals[-1][2] < log.evals[0][2] - 0.1, log.evals

def test_every_flag_of_the_full_command_reaches_the_table_checkpoints_and_wandb(lm, runs, corpus):
    ws, run = runs['full']
    ckdir = ws/'checkpoints'/'my_run'
    log, recs = lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
        expect=dict(lr=0.0003, min_lr=3e-05, weight_decay=0.1, vocab_size=10000, use_wandb=True, wandb_project='my-project',
                    checkpoint_dir='checkpoints/my_run', d_model=32, max_iters=20))
    assert sorted(p.name for p in ckdir.glob('checkpoint_iter_*.pt')) == ['checkpoint_iter_10.pt', 'checkpoint_iter_20.pt']
    (wrun,) = lm.offline_runs(ckdir)
    w = lm.read_wandb_run(wrun)
    assert w.project == 'my-project' and w.config['lr'] == 3e-4, (w.project, w.config)

def _resume_checks(lm, run, ckdir, first_records, corpus, start, max_iters, expect):
    "A resumed run continues at `start`: says so, logs from there on, and metrics.jsonl has no repeated iterations."
    log, recs = lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                                      start=start, expect=dict(expect, max_iters=max_iters))
    assert any(re.fullmatch(rf"Resumed from \S*checkpoint_iter_{start}\.pt at iteration {start}", l) for l in log.lines), run
    assert log.iters[0][0] == start and log.evals[-1][0] == max_iters
    for key in lm.METRIC_KEYS:
        its = [i for i, _ in lm.series(recs, key)]
        assert its == sorted(set(its)), f"{key} repeats or goes back: {its}"
    train_its = [i for i, _ in lm.series(recs, 'train/loss')]
    assert train_its[0] == 0 and train_its[-1] == max_iters - 1 and start in train_its
    # the loss at the resumed iteration is computed from the restored weights on the restored batch stream: the same
    before = dict(lm.series(first_records, 'train/loss'))
    after = dict(lm.series(recs, 'train/loss'))
    assert after[start] == before[start], (after[start], before[start])
    return log, recs

def test_resume_as_written_adopts_the_checkpoint(lm, resumed, corpus):
    "`--resume_from` with nothing but the data paths and a larger `--max_iters`: architecture and the rest come from the checkpoint."
    ws, run, first = resumed['en']
    ckdir = ws/'checkpoints'/'my_run'
    log, recs = _resume_checks(lm, run, ckdir, first, corpus, start=10, max_iters=30,
                               expect=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, context_length=32, vocab_size=10000,
                                           lr=0.0003, batch_size=4, warmup_iters=2, checkpoint_interval=10))
    assert 'Resume: max_iters: 20 -> 30' in log.lines, run
    # use_wandb came from the checkpoint too, and the W&B run continues under the same id
    first_run, *later = lm.offline_runs(ckdir)
    assert later and {p.name.rsplit('-', 1)[1] for p in [first_run, *later]} == {first_run.name.rsplit('-', 1)[1]}

def test_python_m_lm_basics_train_runs_the_quick_test(lm, runs, corpus):
    "The quick test run, through `python -m lm_basics.train`."
    ws, run = runs['quick']
    assert run.args[1:3] == ['-m', 'lm_basics.train'], run.args
    lm.check_training_run(run, checkpoint_dir=ws/'checkpoints', train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                          expect=dict(vocab_size=10000, d_model=32, num_layers=1, batch_size=4))

def test_production_command_names_its_wandb_project_and_run(lm, runs, corpus):
    ws, run = runs['production']
    ckdir = ws/'checkpoints'/'large_model'
    lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                          expect=dict(lr=0.0002, min_lr=2e-05, wandb_project='cs336-final', wandb_run_name='large-model-v1'))
    (wrun,) = lm.offline_runs(ckdir)
    w = lm.read_wandb_run(wrun)
    assert (w.project, w.name) == ('cs336-final', 'large-model-v1')


# ---------------------------------------------------------------------------------------------------- Chinese
def test_flags_override_a_config_file_and_its_run_resumes_with_new_data_flags(lm, runs, resumed, corpus):
    """`--config configs/tinystories_small.json` (its data paths exist in the workspace), kebab-case size flags override
    the file; then `--config ... --resume CHECKPOINT` with `--train-data/--val-data` overrides continues the run."""
    ws, run = runs['config_small']
    ckdir = ws/'checkpoints'/'tinystories_small'
    shipped = json.loads((ws/'configs'/'tinystories_small.json').read_text())
    # the document's small model, as the issue gives it
    assert (shipped['num_layers'], shipped['d_model'], shipped['num_heads']) == (6, 384, 6), shipped
    log, first = lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
        expect=dict(vocab_size=10000, d_model=32, num_layers=1, num_heads=2, d_ff=64, batch_size=4, lr=0.0006,
                    wandb_project='cs336-transformer', wandb_run_name='tinystories-small-6L-384d', wandb_tags='baseline,small',
                    train_data_path='data/tokenized/tinystories_train.uint16.npy', checkpoint_dir='checkpoints/tinystories_small'))
    for k in ('vocab_size', 'rope_theta', 'weight_decay', 'grad_clip', 'wandb_project'):   # not overridden: the file wins over defaults
        assert log.table[k] == str(shipped[k]), k

    ws2, run2, first2 = resumed['zh']
    ckdir2 = ws2/'checkpoints'/'tinystories_small'
    log2, recs = _resume_checks(lm, run2, ckdir2, first2, corpus, start=10, max_iters=30,
                                expect=dict(d_model=32, train_data_path=corpus.path('train', 'npy')))
    assert 'Resume: max_iters: 20 -> 30' in log2.lines, run2
    assert sorted(p.name for p in ckdir2.glob('checkpoint_iter_*.pt')) == [f'checkpoint_iter_{i}.pt' for i in (10, 20, 30)]

def test_gpt2_config_trains_in_bfloat16_with_accumulation(lm, runs, corpus):
    "The GPT-2 config: bfloat16 autocast and 8 accumulation micro-steps, at CPU size."
    ws, run = runs['config_gpt2']
    shipped = json.loads((ws/'configs'/'gpt2_124M.json').read_text())
    assert {k: shipped[k] for k in ('num_layers', 'd_model', 'num_heads', 'context_length')} == \
        dict(num_layers=12, d_model=768, num_heads=12, context_length=1024)   # GPT-2 small, as the issue gives it
    log, recs = lm.check_training_run(run, checkpoint_dir=ws/'checkpoints'/'gpt2_124M', train_tokens=corpus.n_train,
        val_tokens=corpus.n_val, expect=dict(dtype='bfloat16', gradient_accumulation_steps=8, d_model=32, wandb_run_name='gpt2-124M-12L-768d'))
    assert log.count('Tokens per iteration:') == 2 * 16 * 8

def test_kebab_case_flags_train_like_snake_case(lm, runs, corpus):
    "The document's command line in `--kebab-case` with `--train-data/--val-data` on `.npy` files."
    ws, run = runs['kebab']
    lm.check_training_run(run, checkpoint_dir=ws/'checkpoints', train_tokens=corpus.n_train, val_tokens=corpus.n_val,
        expect=dict(vocab_size=10000, train_data_path='data/tokenized/tinystories_train.uint16.npy',
                    val_data_path='data/tokenized/tinystories_valid.uint16.npy', max_iters=20))

def test_wandb_flags_log_an_offline_run_with_project_name_and_tags(lm, runs, corpus):
    "`--wandb --wandb-project --wandb-run-name --wandb-tags`, with the config's data and checkpoint_dir overridden."
    ckdir, ws, run = runs['wandb_flags']
    lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                          expect=dict(use_wandb=True, wandb_tags='baseline,tinystories', checkpoint_dir=ckdir))
    assert not (ws/'checkpoints').exists(), "--checkpoint-dir did not override the config's checkpoint_dir"
    (wrun,) = lm.offline_runs(ckdir)
    w = lm.read_wandb_run(wrun)
    assert (w.project, w.name, w.tags) == ('my-transformers', 'exp-1-tinystories', ['baseline', 'tinystories'])

def test_wandb_settings_in_a_config_file_log_an_offline_run(lm, runs, corpus):
    "Method 2 of the document: the W&B settings written into configs/tinystories_small.json."
    ws, run = runs['wandb_config']
    ckdir = ws/'checkpoints'/'tinystories_small'
    lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                          expect=dict(use_wandb=True, wandb_tags='baseline,small'))
    (wrun,) = lm.offline_runs(ckdir)
    w = lm.read_wandb_run(wrun)
    assert (w.project, w.name, w.tags) == ('cs336-transformer', 'tinystories-small-6L-384d', ['baseline', 'small'])


# ---------------------------------------------------------------------------------------------------- --help
# the defaults of the English document's tables (the issue says they win over the Chinese document's)
EN_DEFAULTS = dict(vocab_size='10000', context_length='256', d_model='512', num_heads='8', d_ff='2048', num_layers='6',
                   rope_theta='10000.0', lr='0.0006', min_lr='6e-05', weight_decay='0.1', beta1='0.9', beta2='0.95',
                   eps='1e-08', batch_size='64', max_iters='100000', warmup_iters='2000', grad_clip='1.0',
                   checkpoint_dir='checkpoints', checkpoint_interval='5000', eval_interval='500', log_interval='100',
                   eval_iters='100', resume_from='None', device='auto', seed='42', use_wandb='False',
                   wandb_project='transformer-lm', wandb_run_name='None')
ZH_FLAG_NAMES = ('--train-data', '--val-data', '--vocab-size', '--context-length', '--num-layers', '--d-model', '--num-heads',
                 '--d-ff', '--rope-theta', '--max-lr', '--min-lr', '--weight-decay', '--beta1', '--beta2', '--grad-clip',
                 '--batch-size', '--max-iters', '--warmup-iters', '--log-interval', '--eval-interval', '--checkpoint-dir',
                 '--checkpoint-interval', '--config', '--resume', '--wandb', '--wandb-project', '--wandb-run-name', '--wandb-tags')

def test_help_lists_every_flag_with_help_and_default(lm, runs):
    from lm_basics.config import FIELDS, HELP
    run = runs['help'][1].ok()
    text = ' '.join(run.stdout.split())
    for name in FIELDS:
        for flag in (f'--{name}', f"--{name.replace('_', '-')}"): assert re.search(rf'{re.escape(flag)}\b', text), flag
        help_text = ' '.join(HELP[name].split())
        assert len(help_text) > len(name) and help_text in text, (name, help_text)
        m = re.search(re.escape(help_text) + r' \(default: ([^)]*)\)', text)
        assert m, f"no '(default: ...)' after the help of {name}"
        if name in EN_DEFAULTS: assert m[1] == EN_DEFAULTS[name], (name, m[1], EN_DEFAULTS[name])
    for flag in ZH_FLAG_NAMES + ('--train_data_path', '--val_data_path', '--resume_from', '--use_wandb', '--lr'):
        assert re.search(rf'{re.escape(flag)}\b', text), flag
