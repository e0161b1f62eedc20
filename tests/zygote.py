"""A fork server for the test suite: it imports PyTorch and lm_basics once, then forks a child for each console-script
run the tests ask for, so that the suite's ~250 runs do not each spend seconds importing PyTorch on a 2-core machine.

Each child is a real process: its own pid and session (signals and `killpg` reach it as they reach an exec'd one), the
requested working directory, environment and `sys.argv`, stdout and stderr on the pipes the test passed over the socket,
stdin on /dev/null, and it runs the console script's own entry point (`lm_basics.cli.<name>`), which exits the
interpreter as the installed script does: atexit handlers (W&B's among them) run, an uncaught exception prints its
traceback and exits 1. What a forked child cannot show is how the tools behave while PyTorch is still importing: tests
of start-up keep exec'ing the console script (`Proc(fork=False)`, see conftest.py).

Protocol (one SOCK_SEQPACKET message each): the server says {"ready": pid} once it has imported everything; a request
is {"id", "entry", "argv0", "args", "cwd", "env"} with two file descriptors (stdout, stderr) attached; the server
answers {"id", "pid"} when it has forked, and {"pid", "status"} (a wait status) when that child has ended. The server
exits when the test process closes its end.

    python tests/zygote.py FD      # FD: this end of a socketpair(AF_UNIX, SOCK_SEQPACKET), inherited
"""
import io, json, os, select, signal, socket, subprocess, sys, threading
from pathlib import Path


# ---------------------------------------------------------------------------------------------------- the tests' end
class Zygote:
    "The test process's end of tests/zygote.py: start it, ask for children, hear when they end."
    def __init__(self, env:dict):
        import tempfile
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
        with self.lock:
            i = self.next_id; self.next_id += 1
            socket.send_fds(self.sock, [json.dumps(dict(id=i, entry=entry, argv0=argv0, args=args, cwd=str(cwd), env=env)).encode()], [out_w, err_w])
        with self.cv:
            self.cv.wait_for(lambda: i in self.pids or self.dead, 60)
            if i not in self.pids: raise RuntimeError('the fork server did not answer')
            return self.pids.pop(i)
    def close(self):
        try: self.sock.shutdown(socket.SHUT_RDWR)   # the server (and the reader thread, blocked in recv) see the end
        except OSError: pass
        self.sock.close()
        try: self.proc.wait(30)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


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


# ---------------------------------------------------------------------------------------------------- the server
def child(sock, wake, req, fds):
    "In the forked child: become the requested process, then run the console script (never returns)."
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    for fd in wake: os.close(fd)
    os.setsid()
    os.dup2(fds[0], 1); os.dup2(fds[1], 2)
    for fd in fds: os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    os.chdir(req['cwd'])
    os.environ.clear(); os.environ.update(req['env'])
    # standard streams made afresh over the new descriptors, as a starting interpreter makes them (the server's were
    # made over its log file, which can seek; a pipe cannot)
    unbuffered = bool(os.environ.get('PYTHONUNBUFFERED'))
    def stream(fd, old, mode):
        raw = io.FileIO(fd, mode, closefd=False)
        buf = raw if unbuffered and mode == 'w' else (io.BufferedWriter(raw) if mode == 'w' else io.BufferedReader(raw))
        return io.TextIOWrapper(buf, encoding=old.encoding, errors=old.errors, write_through=unbuffered and mode == 'w')
    sys.stdin = sys.__stdin__ = stream(0, sys.__stdin__, 'r')
    sys.stdout = sys.__stdout__ = stream(1, sys.__stdout__, 'w')
    sys.stderr = sys.__stderr__ = stream(2, sys.__stderr__, 'w')
    sys.argv = [req['argv0'], *req['args']]
    import random, numpy as np
    random.seed(); np.random.seed()   # what a fresh interpreter would have: its own seeds (torch's default seed is fixed anyway)
    import lm_basics.cli
    getattr(lm_basics.cli, req['entry'])()   # sys.exit(main()), as the installed console script does


def serve(sock):
    import torch  # noqa: F401  (the point of this server)
    import numpy, tokenizers  # noqa: F401
    import lm_basics.cli, lm_basics.train, lm_basics.tokenize, lm_basics.generate, lm_basics.records, lm_basics.bench, lm_basics.export  # noqa: F401
    # what a run imports only once it runs, and a tiny run would spend most of its time importing (measured: 6.5 s
    # in-process for the first tiny run, 1.6 s once these are in): the loss plot's matplotlib (its backend from the
    # suite's MPLBACKEND), the parts of PyTorch building a model on the meta device pulls in, and W&B
    import matplotlib.pyplot, torch._dynamo, wandb  # noqa: F401
    assert threading.active_count() == 1, f"threads running before fork: {threading.enumerate()}"
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *a: None)   # wakes select through the wakeup fd
    send = lambda m: sock.send(json.dumps(m).encode())
    send({'ready': os.getpid()})
    while True:
        ready, _, _ = select.select([sock, r], [], [])
        if r in ready:
            os.read(r, 4096)
            while True:
                try: pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError: break
                if pid == 0: break
                send({'pid': pid, 'status': status})
        if sock in ready:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
            if not msg: return   # the tests are done
            req = json.loads(msg)
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0: child(sock, (r, w), req, fds)   # raises SystemExit: the interpreter exits as the script would
            for fd in fds: os.close(fd)
            send({'id': req['id'], 'pid': pid})


if __name__ == '__main__':
    serve(socket.socket(fileno=int(sys.argv[1])))
