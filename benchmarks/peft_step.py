"""Step time, throughput and peak memory of the same Llama decoder in transformers, full or with PEFT LoRA.

The comparison point for ``benchmarks/llama_step.py``: a model of
``benchmarks/flops.py``'s ``MODELS`` built as a transformers
``LlamaForCausalLM`` (``sdpa`` attention; bf16 on CUDA, float32 on CPU),
trained with ``torch.optim.AdamW`` (fused on CUDA) on random tokens:

* ``full``: every weight trains;
* ``peft``: PEFT LoRA, rank 16, alpha 32, all linear layers, no dropout.

``--compile`` wraps the model in ``torch.compile``. The step is the usual
``model(input_ids, labels=input_ids).loss``, whose float32 logits cover the
whole batch. Peak memory is counted from the first step, after the model is
built and cast. Prints one JSON line::

    python benchmarks/peft_step.py peft --compile                              # GPU, 853M
    python benchmarks/peft_step.py peft --model tiny --batch 2 --seq 32 --steps 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# The shapes of `benchmarks/flops.py`'s MODELS of the same names, repeated so that this
# process never imports JAX (it would share the GPU with torch).
MODELS = {
    "853m": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip


def hf_config(name: str):
    """The transformers ``LlamaConfig`` of one of ``MODELS``."""
    from transformers import LlamaConfig

    m = MODELS[name]
    cfg = LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"],
        tie_word_embeddings=m["tie_word_embeddings"],
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build(args, device: torch.device):
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # The same tokens in every mode: drawn before PEFT's initialisation consumes the global generator.
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODELS[args.model]["vocab_size"], (args.batch, args.seq), generator=generator)
    tokens = tokens.to(device)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(hf_config(args.model)).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if args.mode == "peft":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, lora_config)
    model.train()
    if args.compile:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model, opt, params, tokens, n_params, dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["full", "peft"])
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument("--model", choices=sorted(MODELS), default="853m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps and --warmup must be >= 1; got {args.steps} and {args.warmup}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, opt, params, tokens, n_params, dtype = build(args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    first_loss = float(loss)
    for _ in range(args.warmup - 1):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps

    import peft
    import transformers

    record = {
        "impl": "torch",
        "mode": args.mode + ("+compile" if args.compile else ""),
        "model": args.model,
        "params": n_params,
        "trainable": sum(p.numel() for p in params),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank if args.mode == "peft" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": args.steps,
        "step_ms": round(seconds * 1e3, 2),
        "tokens_per_s": round(args.batch * args.seq / seconds),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
        "warmup_s": round(warmup_s, 1),
        "first_loss": first_loss,
        "loss": float(loss),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
