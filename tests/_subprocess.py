"""Runs a module of the test package in a fresh interpreter and reads the JSON it prints.

Checks that need 8 fake CPU devices must set ``XLA_FLAGS`` before JAX
starts, so they run as ``python -m tests.<module>`` and report one JSON
object on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_json_module(module: str, timeout: int = 300) -> Any:
    """``python -m module`` from the repository root; its stdout parsed as JSON (stderr shown on failure)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
