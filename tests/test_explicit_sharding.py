"""wrap under sharding-in-types: a mesh whose axes are `AxisType.Explicit`.

JAX asks every contraction over sharded axes to name its output sharding
there; wrap's extra low-rank contractions must do so themselves.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wrap_on_an_explicit_mesh():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_explicit_checks.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "explicit-ok" in proc.stdout
