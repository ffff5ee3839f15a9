"""How much slower a LoRA step through ``lora_jax.wrap`` is than the same LoRA written by hand, in one process.

The plain-JAX decoder of ``benchmarks/step_time.py``, trained with AdamW,
both ways: ``wrap`` (the transform over the unmodified forward) and ``hand``
(``x@W + s·(x@A)@B`` written into the forward). Separate processes on a
shared CPU see different loads; here both steps are compiled in one process
and, after warmup, timed alternately (wrap, hand, hand, wrap, ...), each step
on its own, so that a slow spell of the machine hits both. Prints one JSON
line with the median step of each and their ratio::

    python benchmarks/step_ratio.py                      # the "small" size, float32
    python benchmarks/step_ratio.py --size tiny --steps 3 --warmup 1   # smoke run

The ratio is a measurement, not a test: it moves with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from step_time import SIZES, build

MODES = ("wrap", "hand")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each mode after compiling")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")
    c = SIZES[args.size]
    rank = min(args.rank, c["dim"] // 4)

    runs, compile_s, first_loss = {}, {}, {}
    for mode in MODES:
        step, trainable, state, fixed, tokens, _ = build(mode, c, rank=rank, dtype=jnp.dtype(args.dtype))
        t0 = time.perf_counter()
        compiled = step.lower(trainable, state, fixed, tokens).compile()
        trainable, state, loss = compiled(trainable, state, fixed, tokens)
        first_loss[mode] = float(loss)
        compile_s[mode] = round(time.perf_counter() - t0, 2)
        runs[mode] = [compiled, trainable, state, fixed, tokens]

    def one_step(mode):
        compiled, trainable, state, fixed, tokens = runs[mode]
        t0 = time.perf_counter()
        trainable, state, loss = compiled(trainable, state, fixed, tokens)
        jax.block_until_ready((trainable, state, loss))
        runs[mode][1:3] = trainable, state
        return time.perf_counter() - t0, float(loss)

    for _ in range(args.warmup):
        for mode in MODES:
            one_step(mode)
    times = {mode: [] for mode in MODES}
    losses = {}
    for i in range(args.steps):
        # ABBA order: neither mode always runs right after the other.
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            seconds, losses[mode] = one_step(mode)
            times[mode].append(seconds)

    median = {mode: statistics.median(times[mode]) * 1e3 for mode in MODES}
    best = {mode: min(times[mode]) * 1e3 for mode in MODES}
    record = {
        "size": args.size,
        "rank": rank,
        "dtype": args.dtype,
        "tokens": c["batch"] * c["seq"],
        "steps": args.steps,
        "wrap_median_ms": round(median["wrap"], 2),
        "hand_median_ms": round(median["hand"], 2),
        "ratio": round(median["wrap"] / median["hand"], 3),
        "wrap_min_ms": round(best["wrap"], 2),
        "hand_min_ms": round(best["hand"], 2),
        "ratio_min": round(best["wrap"] / best["hand"], 3),
        "compile_s": compile_s,
        "first_loss": first_loss,
        "loss": losses,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
