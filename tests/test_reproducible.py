"""Same seed and config on the CPU give the same loss curve (and the same weights), run after run; another seed
gives another curve."""
import pytest

LOSS_KEYS = ('train/loss', 'train/learning_rate', 'train/grad_norm', 'eval/train_loss', 'eval/val_loss',
             'eval/val_perplexity', 'final/train_loss', 'final/val_loss')

@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus, lm):
    "Three runs on raw .ids files, side by side (at the same time, so they share nothing but the code): seed 42 twice, seed 7 once."
    def one(name_seed):
        name, seed = name_seed
        d = tmp_path_factory.mktemp(f'seed_{name}')
        lm.run('--train_data_path', corpus.path('train', 'ids'), '--val_data_path', corpus.path('val', 'ids'),
               *lm.tiny_flags(vocab_size=256, lr=3e-3, min_lr=3e-4), '--seed', seed, '--no-plot', '--checkpoint_dir', d/'ck', cwd=d).ok()
        return name, (d/'ck', lm.read_metrics(d/'ck'/'metrics.jsonl'))
    return dict(lm.in_parallel(one, [('a', 42), ('b', 42), ('c', 7)], workers=3))

def curve(records, keys=LOSS_KEYS):
    return [(r['iter'], k, r[k]) for r in records for k in keys if k in r]

def test_same_seed_same_losses(runs):
    a, b = curve(runs['a'][1]), curve(runs['b'][1])
    assert len(a) > 20 and {k for _, k, _ in a} == set(LOSS_KEYS)
    assert a == b   # exactly equal floats, not approximately

def test_same_seed_same_weights(runs, lm):
    wa = lm.load_checkpoint(runs['a'][0]/'checkpoint_iter_20.pt')['model_state_dict']
    wb = lm.load_checkpoint(runs['b'][0]/'checkpoint_iter_20.pt')['model_state_dict']
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)

def test_other_seed_other_losses(runs, lm):
    a, c = dict(lm.series(runs['a'][1], 'train/loss')), dict(lm.series(runs['c'][1], 'train/loss'))
    assert a.keys() == c.keys()
    assert all(a[i] != c[i] for i in a), (a, c)   # other initial weights and other batches: every logged loss differs
    # the schedule does not depend on the seed
    assert lm.series(runs['a'][1], 'train/learning_rate') == lm.series(runs['c'][1], 'train/learning_rate')
