"""Run many of the project's scripts as `python script.py args...` would, each in a child forked
from one process that imported the scripts' modules (torch with them) once: a start-up costs a
fork, not the ~2 s of importing torch. Each child runs its script as __main__ with its own argv,
stdin from /dev/null and its own stdout and stderr files, and exits as the interpreter would: with
SystemExit's code, or 1 after printing the traceback of an uncaught exception.

    python tests/forkrun.py JOBS.json OUT.json   # JOBS: {key: [script, arg, ...]}
OUT: {key: {"returncode": int, "stdout": str, "stderr": str}}; a child past the timeout is killed
(returncode -9). Tests call `run(jobs)` (cwd: the repository), which returns
subprocess.CompletedProcess objects. The scripts must import without running (a __main__ guard):
a child forked after its parent ran torch's thread pool would hang in it."""
import atexit
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

TIMEOUT = 300  # s, for each child


def _child(argv: list[str], out: str, err: str):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, out), (2, err)):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)
    try:
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(jobs_file: str, out_file: str):
    jobs = json.loads(Path(jobs_file).read_text())
    for script in {argv[0] for argv in jobs.values()}:  # the scripts' imports, once for every child
        sys.path.insert(0, str(Path(script).resolve().parent))
        try:
            importlib.import_module(Path(script).stem)
        except BaseException:  # (a script that runs on import) its child meets the same
            pass
    tmp = Path(tempfile.mkdtemp())
    todo, running, done = list(jobs.items()), {}, {}
    while todo or running:
        while todo and len(running) < (os.cpu_count() or 2):
            key, argv = todo.pop(0)
            files = str(tmp / f"{len(done) + len(running)}.out"), str(tmp / f"{len(done) + len(running)}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(argv, *files)
            running[pid] = key, files, time.monotonic()
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for p, (_, _, t0) in running.items():
                if time.monotonic() - t0 > TIMEOUT:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.01)
            continue
        key, (out, err), _ = running.pop(pid)
        done[key] = dict(returncode=os.waitstatus_to_exitcode(status), stdout=Path(out).read_text(),
                         stderr=Path(err).read_text())
    Path(out_file).write_text(json.dumps(done))


def run(jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """{key: [script, arg, ...]} -> {key: CompletedProcess} (key a str), run by this file's main."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "jobs.json").write_text(json.dumps(jobs))
        subprocess.run([sys.executable, __file__, f"{d}/jobs.json", f"{d}/out.json"], check=True,
                       timeout=TIMEOUT * (1 + len(jobs)), cwd=Path(__file__).resolve().parents[1])
        out = json.loads((Path(d) / "out.json").read_text())
    return {k: subprocess.CompletedProcess(jobs[k], **r) for k, r in out.items()}


if __name__ == "__main__":
    main(*sys.argv[1:])
