"""How the benchmark talks to its workers: one JSON object per line, over stdin and stdout.

Every measured program (our JAX step, the PyTorch reference, JAX under other XLA flags) runs in
its own worker process, because XLA reads its flags once per process and because a worker's
peak resident memory is then that of one training run. The coordinator keeps all workers of a
model alive and asks each in turn for one timed window, so that machine noise hits them alike.

A worker answers a command {"cmd": name, ...} with {"ok": true, ...} or {"ok": false,
"error": message}. Its stdout carries only these lines: anything else a library prints goes
to stderr (`serve` moves file descriptor 1 there).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

Handler = Callable[..., dict]


class WorkerError(RuntimeError):
    """A worker failed to start or to answer a command; the message holds its stderr tail."""


def peak_rss_bytes() -> int:
    """Returns this process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def restrict_cores(cores: int) -> int:
    """Pins this process to the first `cores` of the CPUs it may use (0: leave all); returns
    the number it may use. Call it before JAX or torch start their thread pools, which size
    themselves from this set."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores:
        os.sched_setaffinity(0, allowed[:cores])
    return len(os.sched_getaffinity(0))


def serve(setup: Callable[[], tuple[dict, Mapping[str, Handler]]]) -> None:
    """Runs a worker: `setup()` returns (ready message, {command: handler}); then answers
    commands from stdin until 'exit' or end of input. Handlers take the command's fields as
    keyword arguments and return a dict."""
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of libraries go to stderr, not into the protocol
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        protocol_out.write(json.dumps(message) + "\n")

    try:
        ready, handlers = setup()
    except Exception as e:  # the coordinator reports it with the model's name
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        raise
    reply({"ok": True, **ready})
    handlers = {"peak_rss": lambda: {"peak_rss_bytes": peak_rss_bytes()}, **handlers}
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "exit":
            break
        try:
            reply({"ok": True, **handlers[name](**command)})
        except Exception as e:
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


class Worker:
    """A worker process seen from the coordinator: start it, send commands, read answers."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ):
        self.name = name
        self._stderr: IO = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.ready: dict | None = None

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            raise WorkerError(
                f"worker {self.name} exited ({self._process.returncode}):\n{self.stderr_tail()}"
            )
        message = json.loads(line)
        if not message.pop("ok"):
            raise WorkerError(f"worker {self.name}: {message['error']}\n{self.stderr_tail()}")
        return message

    def wait_ready(self) -> dict:
        """Blocks until the worker has set up (built, compiled, warmed up); returns its report."""
        self.ready = self._read()
        return self.ready

    def call(self, cmd: str, **fields) -> dict:
        """Sends one command and returns the worker's answer."""
        self._process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self._process.stdin.flush()
        return self._read()

    def stderr_tail(self, lines: int = 30) -> str:
        """Returns the last `lines` lines the worker wrote to stderr."""
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Asks the worker to exit (killing it if it does not within 30 s) and cleans up."""
        if self._process.poll() is None:
            try:
                self._process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self._process.stdin.close()
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._stderr.close()


def start_one_by_one(
    specs: Sequence[tuple[str, Sequence[str], Mapping[str, str] | None, str | Path | None]],
) -> list[Worker]:
    """Starts a worker per (name, argv, env, cwd), each after the previous one is ready (so
    that each compiles alone); returns them. If one fails, stops those started and re-raises."""
    workers = []
    try:
        for name, argv, env, cwd in specs:
            worker = Worker(name, argv, env, cwd=cwd)
            workers.append(worker)
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


def build_extension(tree: Path, *, flag: str, commit: str) -> bool:
    """Gives the checkout `tree` of `commit` its compiled extension, when that commit has one
    (csrc/): without it the commit's layers fall back to XLA's convolutions and "before" would
    time another program. The extension's sources (csrc/, setup.py) the same as this
    checkout's: this checkout's build is copied; otherwise it is built in place as the install
    would (`setup.py build_ext --inplace`, which needs oneDNN's headers in this environment).
    Returns whether the tree has it; says so on stderr when it has not."""
    if not (tree / "csrc").is_dir():
        return False
    root = Path(__file__).resolve().parent.parent
    ours = sorted((root / "models").glob("_onednn_conv*.so"))
    same = subprocess.run(
        ["git", "-C", str(root), "diff", "--quiet", commit, "--", "csrc", "setup.py"],
        capture_output=True,
    )
    if ours and same.returncode == 0:
        for built in ours:
            shutil.copy2(built, tree / "models" / built.name)
        return True
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if any((tree / "models").glob("_onednn_conv*.so")):
        return True
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    print(
        f"{flag}: its oneDNN extension was not built ({tail}); its layers use XLA's "
        "convolutions (its sources differ from this checkout's: building them needs "
        "onednn-devel-cpu-gomp installed here)",
        file=sys.stderr,
    )
    return False


@contextlib.contextmanager
def worktree(commit: str | None, flag: str = "--before_commit") -> Iterator[Path | None]:
    """Yields a temporary `git worktree` of `commit` (None: yields None), removed afterwards:
    an earlier commit's own workers, to time before and after a change in one run. A commit
    git does not know raises a UsageError that names `flag`."""
    from absl import app

    if commit is None:
        yield None
        return
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    with tempfile.TemporaryDirectory(prefix="convnets-before-") as parent:
        tree = Path(parent) / "tree"
        done = subprocess.run(
            [*git, "worktree", "add", "--detach", str(tree), commit],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise app.UsageError(f"{flag}={commit}: {done.stderr.strip()}")
        try:
            build_extension(tree, flag=f"{flag}={commit}", commit=commit)
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], capture_output=True)
