"""Reading what a run leaves behind, for the tests: its console log (`parse_log`), `metrics.jsonl` (the product's own
`read_metrics`), checkpoints, W&B's offline `.wandb` files, and file snapshots to show that a refused command changed
nothing. `check_training_run` checks everything the two specification documents say a finished run prints and writes.
"""
from __future__ import annotations
import hashlib, json, math, os, re, struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from processes import Run


# ---------------------------------------------------------------------------------------------------- reading a run
ITER_RE = re.compile(r'^Iter\s+(\d+) \| Loss: (\S+) \| LR: (\S+) \| Time: (\S+)ms \| Tokens/sec: ([\d,.]+)')
EVAL_RE = re.compile(r'^\[EVAL\] iter\s+(\d+) \| Train loss: (\S+) \| Val loss: (\S+) \| Val ppl: (\S+)')
CKPT_RE = re.compile(r'^\[CHECKPOINT\] Saved checkpoint to (\S*checkpoint_iter_(\d+)\.pt)\s*$')

@dataclass
class Log:
    "What the console log of a run says."
    table: dict = field(default_factory=dict)   # the "Training Configuration" table, values as printed
    iters: list = field(default_factory=list)   # (iter, loss, lr, ms, tokens/sec)
    evals: list = field(default_factory=list)   # (iter, train loss, val loss, val ppl)
    checkpoints: list = field(default_factory=list)  # (path as printed, iteration)
    lines: list = field(default_factory=list)
    def value(self, prefix:str) -> str|None:
        "The rest of the first line that starts with `prefix`."
        return next((l[len(prefix):].strip() for l in self.lines if l.startswith(prefix)), None)
    def count(self, prefix:str) -> int|None:
        v = self.value(prefix)
        return None if v is None else int(v.split()[0].replace(',', ''))

def parse_log(text:str) -> Log:
    log = Log(lines=text.splitlines())
    lines, i = log.lines, 0
    while i < len(lines) and lines[i].strip() != 'Training Configuration': i += 1
    assert i < len(lines), "no 'Training Configuration' table in the log"
    assert set(lines[i+1].strip()) == {'='}, lines[i+1]
    for l in lines[i+2:]:
        if set(l.strip()) == {'='}: break
        k, sep, v = l.partition(' : ')
        assert sep, f"table line without ' : ': {l!r}"
        log.table[k.strip()] = v.strip()
    for l in lines:
        if m := ITER_RE.match(l):
            log.iters.append((int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5].replace(',', ''))))
        elif m := EVAL_RE.match(l): log.evals.append((int(m[1]), float(m[2]), float(m[3]), float(m[4])))
        elif m := CKPT_RE.match(l): log.checkpoints.append((m[1], int(m[2])))
    return log

from lm_basics.records import read_metrics   # the product's one reader of metrics.jsonl (a run directory or the file)

def series(records:list[dict], key:str) -> list[tuple[int, float]]:
    "`(iter, value)` of every metrics record that has `key`."
    return [(r['iter'], r[key]) for r in records if key in r]

def load_checkpoint_file(path) -> dict:
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)

def cosine_lr_ref(it, max_lr, min_lr, warmup, max_iters):
    "The schedule of the English document, written out independently of the library."
    if it < warmup: return max_lr * it / warmup
    if it >= max_iters: return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (max_iters - warmup))) * (max_lr - min_lr)

def expected_parameters(t:dict) -> int:
    "Parameters of the spec's Transformer (no biases, SwiGLU, RMSNorm gains) from the printed configuration."
    V, d, dff, L, nh = (int(t[k]) for k in ('vocab_size', 'd_model', 'd_ff', 'num_layers', 'num_heads'))
    kv = int(t['num_kv_heads']) if t.get('num_kv_heads', 'None') != 'None' else nh   # grouped-query attention: smaller K and V
    tied = t.get('tie_embeddings', 'False') == 'True'
    return V*d + L*(2*d*d + 2*d*(d // nh)*kv + 3*d*dff + 2*d) + d + (0 if tied else V*d)

METRIC_KEYS = ('train/loss', 'train/learning_rate', 'train/tokens_per_sec', 'train/iter_time_ms',
               'eval/train_loss', 'eval/val_loss', 'eval/val_perplexity', 'final/train_loss', 'final/val_loss')

def check_training_run(run:Run, *, checkpoint_dir:Path, train_tokens:int, val_tokens:int,
                       expect:dict|None=None, start:int=0) -> tuple[Log, list[dict]]:
    """Check everything the documents say a finished run prints and writes: the configuration table, data sizes,
    parameter counts, device, iteration/eval/checkpoint lines, the final evaluation, the checkpoint files and
    `metrics.jsonl`. `expect` holds settings the table must show; `start` is the iteration a resumed run starts at."""
    run.ok()
    from lm_basics.config import FIELDS
    log = parse_log(run.stdout)
    t = log.table
    assert set(t) == set(FIELDS), f"configuration table keys differ from TrainConfig: {set(t) ^ set(FIELDS)}"
    for k, v in (expect or {}).items(): assert t[k] == str(v), f"table shows {k} = {t[k]!r}, expected {v!r}\n{run}"
    cfg = {k: t[k] for k in t}
    I = lambda k: int(cfg[k])
    max_iters, log_iv, eval_iv, ck_iv = I('max_iters'), I('log_interval'), I('eval_interval'), I('checkpoint_interval')
    max_lr, min_lr, warmup = float(cfg['lr']), float(cfg['min_lr']), I('warmup_iters')
    tokens_per_iter = I('batch_size') * I('context_length') * I('gradient_accumulation_steps')

    # header: data sizes, parameters, device, where training starts
    assert log.count('Train data size:') == train_tokens, run
    assert log.count('Validation data size:') == val_tokens, run
    assert log.count('Total parameters:') == expected_parameters(t), run
    assert log.count('Trainable parameters:') == expected_parameters(t), run
    assert log.value('Device:') == 'cpu', run
    assert f"Starting training from iteration {start}..." in log.lines, run
    assert log.value('Max iterations:') == str(max_iters)

    # iteration lines: every log_interval and the last step, with the schedule's learning rate
    want_iters = sorted({i for i in range(start, max_iters) if i % log_iv == 0} | {max_iters - 1})
    assert [r[0] for r in log.iters] == want_iters, run
    for it, loss, lr, ms, tps in log.iters:
        assert 0 < loss < 20 and ms > 0 and tps > 0, (it, loss, lr, ms, tps)
        assert lr == pytest.approx(cosine_lr_ref(it, max_lr, min_lr, warmup, max_iters), rel=6e-3, abs=1e-12)
    # eval lines: every eval_interval (not again at a resumed start), then the final evaluation, printed once even when
    # max_iters is itself a multiple of eval_interval (that evaluation is recorded in metrics.jsonl, and the final reuses it)
    periodic = [i for i in range(start, max_iters) if i % eval_iv == 0 and not (start and i == start)]
    assert [e[0] for e in log.evals] == periodic + [max_iters], run
    for it, tl, vl, ppl in log.evals:
        assert 0 < tl < 20 and 0 < vl < 20
        assert ppl == pytest.approx(math.exp(vl), rel=2e-3)
    fin = log.lines.index(next(l for l in log.lines if l.startswith('Final evaluation')))
    assert EVAL_RE.match(next(l for l in log.lines[fin:] if l.startswith('[EVAL]'))), run
    # checkpoint lines: every checkpoint_interval and at the end
    want_ckpts = sorted({i for i in range(start + 1, max_iters) if i % ck_iv == 0} | {max_iters})
    assert [c[1] for c in log.checkpoints] == want_ckpts, run
    for printed, it in log.checkpoints:
        p = Path(printed) if Path(printed).is_absolute() else run.cwd/printed
        assert p.parent.resolve() == checkpoint_dir.resolve(), (printed, checkpoint_dir)
    # the newest keep_last checkpoints are on disk, load with weights_only=True and hold the spec's keys
    on_disk = sorted(int(m[1]) for p in checkpoint_dir.iterdir() if (m := re.fullmatch(r'checkpoint_iter_(\d+)\.pt', p.name)))
    assert max_iters in on_disk and len(on_disk) <= I('keep_last'), on_disk
    for it in want_ckpts[-I('keep_last'):]:
        ck = load_checkpoint_file(checkpoint_dir/f'checkpoint_iter_{it}.pt')
        assert {'model_state_dict', 'optimizer_state_dict', 'iteration', 'config', 'format_version'} <= set(ck), sorted(ck)
        assert ck['iteration'] == it
        assert {k: str(','.join(v) if isinstance(v, list) else v) for k, v in ck['config'].items()} == t
        tied = t.get('tie_embeddings') == 'True'   # then the state dict names the embedding twice, as the LM head too
        n = sum(v.numel() for k, v in ck['model_state_dict'].items() if not (tied and k.endswith('lm_head.weight')))
        assert n == expected_parameters(t), (n, expected_parameters(t))
        assert len(ck['optimizer_state_dict']['state']) > 0, "optimizer state (moments) missing"
    saved_cfg = json.loads((checkpoint_dir/'config.json').read_text())
    assert {k: str(','.join(v) if isinstance(v, list) else v) for k, v in saved_cfg.items()} == t

    # metrics.jsonl: iteration and wall-clock time on every record, every metric, agreeing with the console
    recs = read_metrics(checkpoint_dir/'metrics.jsonl')
    lines = [l for l in (checkpoint_dir/'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert len(lines) == len(recs), "metrics.jsonl of a finished run has lines that do not parse (read_metrics skipped them)"
    assert recs and all(isinstance(r['iter'], int) and isinstance(r['time'], (int, float)) for r in recs), recs[:3]
    times = [r['time'] for r in recs]
    assert times == sorted(times), "metrics time goes backwards"
    for k in METRIC_KEYS: assert series(recs, k), f"metrics.jsonl has no {k}"
    mine = [r for r in recs if r['iter'] >= start]
    tr = {i: v for i, v in series(mine, 'train/loss')}
    for it, loss, lr, ms, tps in log.iters: assert round(tr[it], 4) == pytest.approx(loss, abs=1.5e-4)
    for r in mine:
        if 'train/learning_rate' in r:
            assert r['train/learning_rate'] == pytest.approx(cosine_lr_ref(r['iter'], max_lr, min_lr, warmup, max_iters), rel=1e-9, abs=1e-15)
            assert r['train/tokens_per_sec'] * r['train/iter_time_ms'] / 1000 == pytest.approx(tokens_per_iter, rel=1e-6)
        if 'train/mfu' in r:   # a measurement, on a machine the suite keeps busy: never above 100% of the peak
            assert 0 < r['train/mfu'] <= 1.0, f"iteration {r['iter']}: MFU {r['train/mfu']:.3f} above 100%"
    ev = {i: v for i, v in series(mine, 'eval/val_loss') + series(mine, 'final/val_loss')}
    for it, tl, vl, ppl in log.evals: assert round(ev[it], 4) == pytest.approx(vl, abs=1.5e-4)
    for r in mine:
        for p in ('eval', 'final'):
            if f'{p}/val_loss' in r: assert r[f'{p}/val_perplexity'] == pytest.approx(math.exp(r[f'{p}/val_loss']), rel=1e-9)
    assert [i for i, _ in series(recs, 'final/val_loss')][-1] == max_iters
    return log, recs


# ---------------------------------------------------------------------------------------------------- W&B offline files
WANDB_HEADER = b':W&B' + struct.pack('<HB', 0xBEE1, 0)   # ident, magic, version
WANDB_BLOCK, WANDB_RECORD_HEADER = 32768, 7                # LevelDB log format: blocks of records (crc32, length, type)

def read_wandb_records(path) -> list:
    """Decode a `.wandb` transaction log (what an offline run wrote) into `wandb_internal_pb2.Record` messages.
    The file is a 7-byte header followed by LevelDB-log blocks whose FULL/FIRST/MIDDLE/LAST chunks carry protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:7] == WANDB_HEADER, f"{path} does not start with the W&B header: {data[:7]!r}"
    pos, chunks, pending = len(WANDB_HEADER), [], None
    while pos + WANDB_RECORD_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_RECORD_HEADER: pos += left; continue   # block trailer padding
        _crc, length, kind = struct.unpack('<IHB', data[pos:pos + WANDB_RECORD_HEADER])
        body = data[pos + WANDB_RECORD_HEADER: pos + WANDB_RECORD_HEADER + length]
        pos += WANDB_RECORD_HEADER + length
        if kind == 0 and length == 0: continue                   # zero padding
        assert len(body) == length, f"{path}: truncated record at byte {pos}"
        if kind == 1: chunks.append(body)                        # FULL
        elif kind == 2: pending = body                           # FIRST
        elif kind == 3: pending += body                          # MIDDLE
        elif kind == 4: chunks.append(pending + body); pending = None  # LAST
        else: raise AssertionError(f"{path}: unknown record type {kind} at byte {pos}")
    out = []
    for c in chunks:
        r = pb.Record(); r.ParseFromString(c); out.append(r)
    return out

def offline_runs(checkpoint_dir:Path) -> list[Path]:
    "The offline W&B run directories under `checkpoint_dir/wandb`."
    return sorted((Path(checkpoint_dir)/'wandb').glob('offline-run-*'))

@dataclass
class WandbRun:
    "What an offline W&B run recorded, read back from its `.wandb` file."
    project: str
    name: str
    tags: list
    config: dict
    history: list   # one dict per logged step: {'_step': n, key: value, ...}
    summary: dict

def read_wandb_run(run_dir:Path) -> WandbRun:
    files = list(Path(run_dir).glob('run-*.wandb'))
    assert len(files) == 1, files
    project = name = None; tags, config, history, summary = [], {}, [], {}
    key = lambda item: '/'.join(item.nested_key) if item.nested_key else item.key
    for r in read_wandb_records(files[0]):
        kind = r.WhichOneof('record_type')
        if kind == 'run':
            project, name, tags = r.run.project, r.run.display_name, list(r.run.tags)
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == 'config': config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == 'history': history.append({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == 'summary': summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
    config.pop('_wandb', None)
    return WandbRun(project, name, tags, config, history, summary)


# ---------------------------------------------------------------------------------------------------- files untouched
def snapshot(*roots) -> dict:
    "Every file and directory under `roots`: mode, size, mtime and content hash (files), so a later call can show any change."
    out = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob('*'))]:
            if p.is_symlink(): out[str(p)] = ('link', os.readlink(p))
            elif p.is_dir(): out[str(p)] = ('dir', oct(p.stat().st_mode))
            elif p.is_file():
                st = p.stat()
                try: digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError: digest = 'unreadable'
                out[str(p)] = ('file', oct(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return out


def changes(before:dict, after:dict) -> dict:
    "What differs between two snapshots: {path: (before, after)}."
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)}

