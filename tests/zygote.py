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
import io, json, os, select, signal, socket, sys, threading


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
