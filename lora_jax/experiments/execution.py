"""HumanEval pass@1: running generated programs in a guarded subprocess.

`check_completion` joins a HumanEval problem's prompt, a model's completion and
the problem's tests into one program, and `run_program` runs it:

* in a fresh ``python -I`` interpreter (no user site, no ``PYTHON*``
  variables, script directory not on ``sys.path``) with a minimal
  environment, ``stdin`` at end of file, and its own session and process
  group, which is killed as a whole once the program ends or times out;
* in a new empty temporary working directory, deleted afterwards (``HOME``
  and ``TMPDIR`` point there too);
* under resource limits the child sets on itself before the program starts:
  address space (``memory_mb``), CPU seconds, size of written files, number
  of open files, and no core dumps;
* after a preamble that replaces what generated code has no business
  calling with functions that raise ``PermissionError``: starting processes
  (``os.system``, ``os.popen``, ``os.fork``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn*``, ``subprocess``), signalling them (``os.kill``,
  ``os.killpg``), deleting, renaming or truncating files (``os.remove``,
  ``os.unlink``, ``os.rmdir``, ``os.removedirs``, ``os.rename``,
  ``os.replace``, ``os.truncate``, ``shutil.rmtree``, ``shutil.move``),
  changing permissions or owners, links, ``os.chdir``, opening sockets,
  ``exit``/``quit``/``os._exit``, and opening files for writing outside the
  working directory (``open``, ``io.open``, ``os.open``).

This guards against *accidents*: a model's code that deletes files, spawns
processes, loops forever or allocates without bound. It is **not a security
boundary**. Code that means harm can undo the preamble (it runs in the same
interpreter), reach the operating system through ``ctypes`` or ``_socket``,
read any file the user can read, create directories, and use the CPU and
memory up to the limits. Run untrusted code in a container or VM.

The limits are set by the child itself, at the top of its preamble, rather
than in a ``preexec_fn``: ``preexec_fn`` runs Python between ``fork`` and
``exec`` and can deadlock when the parent has other threads, as any process
running JAX does. POSIX only (Linux, macOS).

References:
    Chen et al., "Evaluating Large Language Models Trained on Code", 2021.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

__all__ = [
    "STOP_SEQUENCES",
    "ExecutionResult",
    "check_completion",
    "pass_at_1",
    "run_program",
    "truncate_completion",
]

Status = Literal["passed", "failed", "timeout", "error"]

#: Markers that end a completion wherever they appear: a Markdown fence and chat/end-of-text tokens.
#: `truncate_completion` also ends it at any line that starts in column 0 (``def``, ``class``, ``if``,
#: ``print(``, ``#`` and every other new top-level statement).
STOP_SEQUENCES = ("```", "<|endoftext|>", "<|im_end|>", "<|im_start|>")

PROBLEM_KEYS = ("prompt", "test", "entry_point")

# Exit codes the preamble uses to report the verdict (anything else is an error).
_PASSED, _FAILED, _ERROR = 0, 3, 4
_OUTPUT_CHARS = 2000  # kept of each of stdout and stderr (the end, where tracebacks are)
_DETAIL_CHARS = 300
_FILE_BYTES = 16 * 2**20  # largest file the child may write, its stdout and stderr included
_OPEN_FILES = 64
_PROGRAM_NAME = "<program>"

# Runs in the child as `python -I -X utf8 -B preamble.py PROGRAM MEMORY CPU FILE_BYTES OPEN_FILES`, after two lines
# that define NAME, DETAIL, PASSED, FAILED and ERROR.
_PREAMBLE = r"""
import sys


def _main():
    import builtins, io, linecache, os, resource, traceback
    import _posixsubprocess, shutil, socket, subprocess

    program, memory, cpu, file_bytes, open_files = sys.argv[1], *map(int, sys.argv[2:6])
    # The CPU hard limit is one second later, so the soft one ends the child with SIGXCPU, not SIGKILL.
    for limit, soft, hard in (
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_NOFILE, open_files, open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        _, current = resource.getrlimit(limit)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(limit, (soft, hard))

    with open(program, encoding="utf-8") as f:
        source = f.read()
    linecache.cache[NAME] = (len(source), None, source.splitlines(True), NAME)
    exit_now, stdout, stderr = os._exit, sys.stdout, sys.stderr

    def finish(code, summary=None):
        try:
            if summary is not None:
                print(summary[:DETAIL], file=stderr)
            stdout.flush()
            stderr.flush()
        finally:
            exit_now(code)

    workdir = os.path.realpath(os.getcwd())

    def outside(path):
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path != workdir and not path.startswith(workdir + os.sep)

    def blocked(name):
        def disabled(*args, **kwargs):
            raise PermissionError(f"{name} is disabled while running generated code")

        disabled.__name__ = name.rpartition(".")[2]
        return disabled

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and outside(file):
            raise PermissionError(f"writing {file!r} outside the working directory is disabled")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and (outside(path) or kwargs.get("dir_fd") is not None):
            raise PermissionError(f"writing {path!r} outside the working directory is disabled")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("socket.socket is disabled while running generated code")

    socket.socket = socket.SocketType = BlockedSocket
    disabled = {
        os: (
            "system popen fork forkpty kill killpg _exit abort "
            "execl execle execlp execlpe execv execve execvp execvpe "
            "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp "
            "remove unlink rmdir removedirs rename renames replace truncate ftruncate "
            "chdir fchdir chroot chmod fchmod lchmod chown fchown lchown link symlink mkfifo mknod "
            "setuid seteuid setgid setegid setreuid setregid setresuid setresgid"
        ),
        shutil: "rmtree move chown",
        subprocess: "Popen run call check_call check_output getoutput getstatusoutput",
        socket: "create_connection create_server socketpair fromfd",
        _posixsubprocess: "fork_exec",
        builtins: "exit quit",
    }
    for module, names in disabled.items():
        for name in names.split():
            if hasattr(module, name):
                setattr(module, name, blocked(f"{module.__name__}.{name}"))

    try:
        exec(compile(source, NAME, "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except AssertionError as err:
        traceback.print_exc()
        finish(FAILED, _summary(err, traceback))
    except SystemExit as err:
        finish(ERROR, f"the program exited early (SystemExit: {err.code!r})")
    except BaseException as err:
        try:
            traceback.print_exc()
        finally:
            finish(ERROR, _summary(err, traceback))
    finish(PASSED)


def _summary(err, traceback):
    summary = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == NAME]
    if frames:
        summary += f" (line {frames[-1].lineno}: {(frames[-1].line or '').strip()})"
    return summary


_main()
"""


class ExecutionResult(NamedTuple):
    """The outcome of running one program.

    Attributes:
        status: ``"passed"`` (ran to the end), ``"failed"`` (an
            ``AssertionError``: a test did not pass), ``"timeout"`` (out of
            wall-clock or CPU time) or ``"error"`` (any other exception,
            a syntax error, running out of memory, calling ``exit``, a
            blocked operation, a crash).
        detail: A one-line explanation, e.g. ``"AssertionError (line 12:
            assert candidate(3) == 5)"``; empty when passed.
        stdout: The program's standard output; only its last 2000 characters,
            after ``"..."``, if it was longer.
        stderr: Its standard error, cut the same way.
    """

    status: Status
    detail: str
    stdout: str
    stderr: str


def _check_limits(timeout_s: Any, memory_mb: Any) -> tuple[float, int]:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"`timeout_s` must be a positive number of seconds, got {timeout_s!r}.")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(
            f"`memory_mb` must be an integer of at least 64 (the interpreter alone needs tens of MB), "
            f"got {memory_mb!r}."
        )
    return float(timeout_s), memory_mb


def _tail(path: pathlib.Path, chars: int) -> str:
    """The last ``chars`` characters (roughly: 4 bytes each at most) of a file, marked if cut."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * chars))
        text = f.read().decode("utf-8", errors="replace")
    return text if len(text) <= chars and size <= 4 * chars else "..." + text[-chars:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """Waits until ``proc`` exits (True) or ``deadline`` passes (False), leaving it unreaped.

    An exited but unreaped leader keeps its process-group id reserved, so the
    group can be killed afterwards without hitting a stranger that reused it.
    """
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: reap, and accept the tiny reuse window
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.02)


def _verdict(returncode: int, timed_out: bool, timeout_s: float, stderr: str) -> tuple[Status, str]:
    last_line = stderr.rstrip().rpartition("\n")[2].strip()
    if timed_out:
        return "timeout", f"still running after {timeout_s:g} s"
    if returncode == _PASSED:
        return "passed", ""
    if returncode == _FAILED:
        return "failed", last_line or "AssertionError"
    if returncode == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if returncode == _ERROR:
        return "error", last_line or "exception"
    if returncode < 0:
        return "error", f"killed by {signal.Signals(-returncode).name}"
    return "error", f"exit code {returncode}" + (f": {last_line}" if last_line else "")


def run_program(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Runs a Python program in a guarded subprocess and reports how it ended.

    See the module docstring for the isolation: a fresh ``python -I``
    process in its own session and an empty temporary directory, resource
    limits, and a preamble that disables deleting files, starting processes,
    sockets and the like. This guards against accidents, not against
    malicious code. The program runs as ``__main__``; it passes if it runs to
    its end.

    Args:
        program: Python source code.
        timeout_s: Wall-clock limit in seconds, interpreter start-up included.
            The CPU-time limit is this rounded up, plus one second.
        memory_mb: Address-space limit of the child, in MiB (at least 64).

    Returns:
        An `ExecutionResult`: ``status`` ``"passed"``, ``"failed"``
        (``AssertionError``), ``"timeout"`` or ``"error"``, with a short
        ``detail`` and the ends of the program's stdout and stderr.

    Raises:
        TypeError: If ``program`` is not a string.
        ValueError: If ``timeout_s`` is not a positive number or ``memory_mb``
            is not an integer of at least 64.

    >>> run_program("assert 1 + 1 == 2").status
    'passed'
    >>> run_program("assert 1 + 1 == 3").status
    'failed'
    >>> run_program("import os; os.remove('data.csv')").detail
    "PermissionError: os.remove is disabled while running generated code (line 1: import os; os.remove('data.csv'))"
    """
    if not isinstance(program, str):
        raise TypeError(f"`program` must be a string of Python source, got {type(program).__name__}.")
    timeout_s, memory_mb = _check_limits(timeout_s, memory_mb)
    with tempfile.TemporaryDirectory(prefix="lora_jax_exec_") as root:
        root = pathlib.Path(root)
        workdir = root / "work"
        workdir.mkdir()
        # The program and preamble live beside the working directory, not in it.
        (root / "program.py").write_text(program, encoding="utf-8")
        constants = (
            f"NAME, DETAIL = {_PROGRAM_NAME!r}, {_DETAIL_CHARS}\n"
            f"PASSED, FAILED, ERROR = {_PASSED}, {_FAILED}, {_ERROR}\n"
        )
        (root / "preamble.py").write_text(constants + _PREAMBLE, encoding="utf-8")
        command = [
            sys.executable,
            "-I",
            "-X",
            "utf8",
            "-B",
            str(root / "preamble.py"),
            str(root / "program.py"),
            str(memory_mb * 2**20),
            str(math.ceil(timeout_s) + 1),
            str(_FILE_BYTES),
            str(_OPEN_FILES),
        ]
        env = {
            "PATH": os.defpath,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            # Native thread pools reserve memory per thread, which a small address space cannot hold.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            try:
                exited = _wait_unreaped(proc, time.monotonic() + timeout_s)
            finally:
                _kill_group(proc.pid)  # whatever it left behind, or all of it on timeout
                proc.wait()
        stdout, stderr = _tail(root / "stdout", _OUTPUT_CHARS), _tail(root / "stderr", _OUTPUT_CHARS)
    status, detail = _verdict(proc.returncode, not exited, timeout_s, stderr)
    return ExecutionResult(status, detail[:_DETAIL_CHARS], stdout, stderr)


def _program(problem: Mapping[str, Any], completion: str) -> str:
    if not isinstance(problem, Mapping):
        raise TypeError(f"`problem` must be a mapping (a HumanEval row), got {type(problem).__name__}.")
    missing = [k for k in PROBLEM_KEYS if k not in problem]
    if missing:
        raise ValueError(
            f"`problem` is missing {missing}; a HumanEval row (`lora_jax.experiments.data.humaneval()`) "
            f"has {list(PROBLEM_KEYS)}, got keys {sorted(problem)}."
        )
    if not isinstance(completion, str):
        raise TypeError(f"`completion` must be a string, got {type(completion).__name__}.")
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_completion(
    problem: Mapping[str, Any], completion: str, *, timeout_s: float = 5.0, memory_mb: int = 512
) -> ExecutionResult:
    """Runs a HumanEval problem's tests on a model's completion of its prompt.

    The program is ``prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n"``,
    run with `run_program`. Truncate a free-running generation with
    `truncate_completion` first.

    Args:
        problem: A HumanEval row with ``prompt``, ``test`` and ``entry_point``
            (as from `lora_jax.experiments.data.humaneval`).
        completion: The function body that continues ``prompt``.
        timeout_s: Wall-clock limit in seconds, see `run_program`.
        memory_mb: Address-space limit in MiB, see `run_program`.

    Returns:
        The `ExecutionResult`; ``"passed"`` means every test passed.

    Raises:
        TypeError: If ``problem`` is not a mapping or ``completion`` not a string.
        ValueError: If ``problem`` lacks a column, or for bad limits.

    >>> problem = {"prompt": "def add(a, b):\\n", "test": "def check(f):\\n    assert f(2, 3) == 5\\n",
    ...            "entry_point": "add"}
    >>> check_completion(problem, "    return a + b").status
    'passed'
    >>> check_completion(problem, "    return a * b").detail
    'AssertionError (line 4: assert f(2, 3) == 5)'
    """
    return run_program(_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)


_TOP_LEVEL_LINE = re.compile(r"\n(?=\S)")


def truncate_completion(text: str) -> str:
    """Cuts a generated function body where the function ends.

    The body ends at the first line after the first that starts in column 0
    (a new top-level ``def``, ``class``, ``if``, ``print(``, ``#`` comment,
    decorator, or any other statement: the usual HumanEval stop sequences
    ``"\\ndef"``, ``"\\nclass"``, ``"\\nif"``, ``"\\nprint"``, ``"\\n#"``
    and more), or at the first of `STOP_SEQUENCES` (a Markdown fence, chat
    tokens) anywhere, whichever comes first. Trailing whitespace is removed.
    Lines with only whitespace do not end the body. A string literal whose
    continuation lines start in column 0 is cut too, as with the usual stop
    sequences.

    Args:
        text: A generation that continues a HumanEval prompt (an indented body).

    Returns:
        The body alone.

    Raises:
        TypeError: If ``text`` is not a string.

    >>> truncate_completion("    return a + b\\n\\n\\ndef test():\\n    pass\\n")
    '    return a + b'
    >>> truncate_completion("    x = 1\\n\\n    return x\\n```\\nThe function adds.")
    '    x = 1\\n\\n    return x'
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    cut = len(text)
    match = _TOP_LEVEL_LINE.search(text)
    if match is not None:
        cut = match.start()
    for stop in STOP_SEQUENCES:
        index = text.find(stop, 0, cut)
        if index >= 0:
            cut = index
    return text[:cut].rstrip()


def pass_at_1(
    problems: Iterable[Mapping[str, Any]],
    completions: Sequence[str] | Mapping[str, str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
) -> dict[str, Any]:
    """The fraction of problems whose one (greedy) completion passes its tests.

    With one sample per problem, pass@1 is simply the share of problems
    passed. Programs run one after another with `check_completion`;
    completions are used as given (apply `truncate_completion` first).

    Args:
        problems: HumanEval rows, each with ``task_id``, ``prompt``, ``test``
            and ``entry_point`` (a ``datasets.Dataset`` works).
        completions: One completion per problem, in the same order, or a
            mapping from ``task_id`` to completion.
        timeout_s: Wall-clock limit per problem in seconds, see `run_program`.
        memory_mb: Address-space limit per problem in MiB, see `run_program`.

    Returns:
        A dict with ``pass_at_1`` (float in ``[0, 1]``), ``num_problems``,
        ``num_passed``, and per ``task_id`` its ``statuses`` and ``details``.

    Raises:
        ValueError: If there are no problems, the counts differ, a
            ``task_id`` is missing, repeated or has no completion, or for bad
            limits.
        TypeError: As `check_completion`.

    >>> problems = [{"task_id": "t/0", "prompt": "def one():\\n", "test": "def check(f):\\n    assert f() == 1\\n",
    ...              "entry_point": "one"}]
    >>> pass_at_1(problems, ["    return 1"])["pass_at_1"]
    1.0
    """
    problems = list(problems)
    _check_limits(timeout_s, memory_mb)
    if not problems:
        raise ValueError("`problems` is empty; pass at least one HumanEval row.")
    task_ids = []
    for i, problem in enumerate(problems):
        if not isinstance(problem, Mapping) or "task_id" not in problem:
            raise ValueError(f"`problems[{i}]` has no `task_id`; pass HumanEval rows.")
        task_ids.append(problem["task_id"])
    repeated = sorted({t for t in task_ids if task_ids.count(t) > 1})
    if repeated:
        raise ValueError(f"`problems` repeats task ids {repeated[:5]}.")
    if isinstance(completions, Mapping):
        missing = [t for t in task_ids if t not in completions]
        if missing:
            raise ValueError(f"`completions` has no entry for {len(missing)} task ids, e.g. {missing[:5]}.")
        ordered = [completions[t] for t in task_ids]
    else:
        ordered = list(completions)
        if len(ordered) != len(problems):
            raise ValueError(
                f"`completions` must have one entry per problem: got {len(ordered)} for {len(problems)} problems."
            )
    statuses, details = {}, {}
    for task_id, problem, completion in zip(task_ids, problems, ordered):
        result = check_completion(problem, completion, timeout_s=timeout_s, memory_mb=memory_mb)
        statuses[task_id], details[task_id] = result.status, result.detail
    num_passed = sum(status == "passed" for status in statuses.values())
    return {
        "pass_at_1": num_passed / len(problems),
        "num_problems": len(problems),
        "num_passed": num_passed,
        "statuses": statuses,
        "details": details,
    }
