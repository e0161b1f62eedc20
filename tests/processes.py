"""Running the console scripts as real processes, for the tests: `run_cli` to the end, `start_cli` in the background
(`Proc`: `wait_for` a line, `signal`, `finish`), two at a time with `in_parallel`; most are forked from the suite's fork
server (tests/zygote.py) to save PyTorch's import. Also what a test needs of the machine: root-only tools (a tmpfs for
a full disk, dropping CAP_DAC_OVERRIDE to meet file permissions as root), skipped where missing, failed in CI.
"""
from __future__ import annotations
import os, re, shutil, signal, subprocess, sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from zygote import Zygote, Forked

RUN_TIMEOUT = 300  # seconds; a tiny run takes a few, but the machine is shared


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

def started() -> int:
    "How many processes the tests have started so far (a mark for `kill_started_since`)."
    return len(_STARTED)

def kill_started_since(first:int):
    """Kill (their process groups) the processes started since the mark `first` that still run; forget the finished ones.
    Processes started before the mark (by a module or session fixture) stay while they run: their fixture may still use them."""
    _kill(_STARTED[first:])
    _STARTED[:] = [p for p in _STARTED[:first] if p.p.poll() is None]

def kill_all():
    "The end of the session: every process still running, and the fork server."
    _kill(_STARTED); _STARTED.clear()
    if _ZYGOTE is not None: _ZYGOTE.close()

# ---------------------------------------------------------------------------------------------------- the fork server
# Most runs are forked from a server that imported PyTorch and lm_basics once (tests/zygote.py): a real process each,
# without the seconds of imports (the suite starts ~250). Runs whose start-up is under test, `python -m`, torchrun,
# resource limits, dropped permissions and environment variables read at import time are exec'd as before.
# LM_BASICS_TEST_FORK=0 exec's every run.
IMPORT_TIME_ENV = ('OMP_', 'MKL_', 'PYTHON', 'LD_', 'TORCH', 'CUDA', 'KMP_')

_ZYGOTE: Zygote|None = None

def zygote() -> Zygote:
    "This test process's fork server, started on first use with the environment of that moment (the suite's)."
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.dead: _ZYGOTE = Zygote(dict(os.environ))
    return _ZYGOTE

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
    args, out, where, i = [str(a) for a in args], [], {}, 0
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




def mount_small_tmpfs(where:Path, size:int):
    "Mount a tmpfs of `size` bytes at `where` (a full disk on demand); skip (fail in CI) where that needs root we lack."
    where.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT: missing_tool("simulating a full disk mounts a small tmpfs, which needs root")
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)], capture_output=True, text=True)
    if r.returncode != 0: missing_tool(f"simulating a full disk mounts a small tmpfs, and mount failed: {r.stderr.strip()}")
