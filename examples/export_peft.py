"""Train LoRA adapters, checkpoint and resume them, and hand them to the Hugging Face stack.

1. Fine-tunes SmolLM2-135M-Instruct with LoRA (rank 16 on all seven
   projections) on Python code for a few steps; ``--smoke`` uses a tiny random
   Llama and random tokens instead.
2. Checkpoints the run halfway with `lora_jax.checkpoint`, restores it from
   disk as a new process would (no template: the adapter tree comes from the
   checkpoint) and trains the second half.
3. Exports the adapters in PEFT's format (``adapter_model.safetensors`` and
   ``adapter_config.json``) and the merged model as a Hugging Face checkpoint
   (``config.json`` and ``model.safetensors``), plus the base model as the
   checkpoint PEFT's adapter applies to.
4. Where transformers and PEFT are installed, loads both back with them and
   prints how far their logits are from ``lora_jax.wrap``'s.

    python examples/export_peft.py                  # SmolLM2, 20 steps: a few minutes on 2 CPU cores
    python examples/export_peft.py --smoke          # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax import checkpoint, peft
from lora_jax.models import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    scan_layers=True,
)


def load(smoke: bool, steps: int, batch: int, seq: int):
    """(config, params, batches of input ids): a tiny random model or SmolLM2 on standard-library code."""
    if smoke:
        model = LlamaForCausalLM(TINY)
        params = model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
        # A learnable stream: each row counts up from a random start.
        rng = np.random.default_rng(0)
        starts = rng.integers(0, TINY.vocab_size, size=(steps, batch, 1))
        ids = (starts + np.arange(seq)) % TINY.vocab_size
        return TINY, params, ids.astype(np.int32)
    from lora_jax.experiments import data
    from lora_jax.models import load_smollm2, load_smollm2_tokenizer

    config, params = load_smollm2(scan_layers=True)
    tok = load_smollm2_tokenizer()
    texts = data.python_code("train", max_documents=200)["text"]
    packed = data.pack_texts(texts, tok, seq_len=seq)
    rows = itertools.islice(data.batches(packed, batch_size=batch, seed=0, epochs=None), steps)
    return config, params, np.stack([r["input_ids"] for r in rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="LoRA: train, checkpoint, resume, export to PEFT and transformers.")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, a few steps (for tests)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    args = parser.parse_args(argv)
    steps, lr = (6, 1e-2) if args.smoke else (args.steps, args.lr)
    seq = 16 if args.smoke else args.seq
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="lora_export_"))
    t0 = time.perf_counter()

    config, params, ids = load(args.smoke, steps, args.batch, seq)
    model = LlamaForCausalLM(config)
    spec = lora.LoraSpec(rank=args.rank, alpha=2 * args.rank, targets="all-linear")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(1), trace=lambda p: model.apply(p, ids[0]))
    untrained = adapters
    apply = lora.wrap(model.apply)
    opt = optax.adamw(lr, weight_decay=0.01)

    @jax.jit
    def train_step(adapters, opt_state, batch):
        def loss_fn(ad):
            logits = apply(frozen, ad, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    # First half, then a checkpoint.
    ckpt_dir = out / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    opt_state, losses, half = opt.init(adapters), [], steps // 2
    for i in range(half):
        adapters, opt_state, loss = train_step(adapters, opt_state, ids[i])
        losses.append(float(loss))
    with checkpoint.CheckpointManager(ckpt_dir, max_to_keep=2) as ckpt:
        ckpt.save(half, adapters, opt_state=opt_state, spec=spec, data={"next_batch": half})
    del adapters, opt_state

    # Resume from disk: the adapters (with their LoraFactors metadata) and the
    # optimizer state come from the checkpoint, checked against the model.
    state = checkpoint.restore(ckpt_dir, optimizer=opt, frozen=frozen, spec=spec)
    adapters, opt_state = state.adapters, state.opt_state
    for i in range(state.data["next_batch"], steps):
        adapters, opt_state, loss = train_step(adapters, opt_state, ids[i])
        losses.append(float(loss))
    print(
        f"trained {steps} steps (checkpointed and resumed at step {state.step}): loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}"
    )

    # Export: a PEFT adapter, the merged model, and the base model the adapter applies to.
    peft.export_peft(adapters, spec, out / "adapter", base_model_name_or_path=str(out / "base"))
    peft.export_merged_hf(frozen, adapters, config, out / "merged")
    peft.export_merged_hf(frozen, untrained, config, out / "base")  # B = 0: exactly the base weights
    print(f"wrote {out / 'adapter'}, {out / 'merged'} and {out / 'base'}")

    result = {"losses": losses, "out": str(out)}
    probe = ids[-1][:2]
    ours = np.asarray(apply(frozen, adapters, probe))
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("peft"):
        import peft as hf_peft
        import torch
        import transformers

        with torch.no_grad():
            tokens = torch.from_numpy(np.asarray(probe, np.int64))
            base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
            peft_model = hf_peft.PeftModel.from_pretrained(base, out / "adapter").eval()
            peft_logits = peft_model(tokens).logits.numpy()
            merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
            merged_logits = merged(tokens).logits.numpy()
        result["peft_max_abs_diff"] = float(np.abs(peft_logits - ours).max())
        result["merged_max_abs_diff"] = float(np.abs(merged_logits - ours).max())
        scale = float(np.abs(ours).max())
        print(
            f"logits, max |ours - PEFT| = {result['peft_max_abs_diff']:.2e}, max |ours - transformers(merged)| = "
            f"{result['merged_max_abs_diff']:.2e} (logits up to {scale:.1f})"
        )
    else:
        print("transformers/peft not installed: skipped loading the exports back")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
