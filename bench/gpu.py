"""The accelerator check of issue 10, as one script to run on a lent GPU (or TPU):

(a) a LLaMA training step of about 1B parameters (float32 master weights, bf16 matmuls)
    with AdamW and with OSF (rank 0.5 on q,k,v,o,gate,up,down): tokens/s and model FLOPs
    utilisation, MFU = 6 x params x tokens/s / the chip's peak bf16 FLOP/s
    (goal: >= 40% for AdamW);
(b) the OSF / AdamW step-time ratio in the same run (goal <= 1.10);
(c) the basis-build time of LLaMA-2-7B's 224 targeted matrices (32 layers of q, k, v, o
    4096 x 4096, gate, up 4096 x 11008, down 11008 x 4096), ``svd`` and ``gram``
    (goal < 60 s).

Steps reuse ``bench/optim.py``'s jitted, donated step (the loop's loss). Each timing is
the median of ``--steps`` steps after compile and warm-up. Usage on the device:
``python bench/gpu.py [--preset 1b] [--batch 8] [--seq 2048] [--remat dots_no_batch]
[--json OUT.json]``; ``--preset tiny --basis-scale 0.03125`` is a CPU smoke run of the
same code at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optim import TARGETS, batch, cljax_step, osf_tx  # bench/optim.py

from cljax.models.layers import DTypePolicy
from cljax.models.llama import Llama, LlamaConfig
from cljax.optim.subspace import build_bases

# Dense bf16 peak FLOP/s by device kind (vendor figures, without sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
# about 1.1B parameters (TinyLlama's shape): width 2048, 22 layers, GQA 32/4, SwiGLU 5632;
# "tiny" is LlamaConfig's own preset (CPU smoke runs)
PRESETS = {
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
}
LLAMA_7B_STACKS = {  # name: (m, n), 32 layers each
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (4096, 11008),
    "up": (4096, 11008),
    "down": (11008, 4096),
}


def peak_flops() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return kind, flops
    return kind, None


def median_step_seconds(run, steps: int) -> float:
    run()  # warm-up after compile
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def train_figures(args: argparse.Namespace) -> dict:
    policy = DTypePolicy("float32", "bfloat16")
    if args.preset == "tiny":
        cfg = LlamaConfig.preset("tiny", policy=policy, remat=args.remat)
    else:
        cfg = LlamaConfig(**PRESETS[args.preset], policy=policy, remat=args.remat)
    data = batch(cfg, args.batch, args.seq)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    adamw = cljax_step(cfg, optax.adamw(1e-5, weight_decay=0.01), data)
    adamw_s = median_step_seconds(adamw, args.steps)
    del adamw
    osf = cljax_step(cfg, osf_tx(cfg), data)
    osf_s = median_step_seconds(osf, args.steps)
    tokens = args.batch * args.seq
    kind, peak = peak_flops()
    out = {
        "device": kind,
        "params": params,
        "tokens_per_step": tokens,
        "adamw_step_s": round(adamw_s, 4),
        "osf_step_s": round(osf_s, 4),
        "osf_over_adamw": round(osf_s / adamw_s, 3),
        "adamw_tokens_per_s": round(tokens / adamw_s),
        "osf_tokens_per_s": round(tokens / osf_s),
    }
    if peak:
        out["adamw_mfu"] = round(6 * params * tokens / adamw_s / peak, 3)
        out["osf_mfu"] = round(6 * params * tokens / osf_s / peak, 3)
    return out


def basis_figures(args: argparse.Namespace) -> dict:
    """Time the 224-matrix basis build (rank 0.5) for both methods."""
    out = {}
    key = jax.random.key(0)
    matrices = {}
    for name, (m, n) in LLAMA_7B_STACKS.items():
        key, sub = jax.random.split(key)
        shape = (args.basis_layers, int(m * args.basis_scale), int(n * args.basis_scale))
        matrices[name] = jax.random.normal(sub, shape, jnp.float32)
    ranks = {name: min(x.shape[-2:]) // 2 for name, x in matrices.items()}
    for method in ("svd", "gram"):
        jax.block_until_ready(build_bases(matrices, ranks, method=method))  # compile
        started = time.perf_counter()
        jax.block_until_ready(build_bases(matrices, ranks, method=method))
        out[f"basis_build_{method}_s"] = round(time.perf_counter() - started, 2)
    out["basis_matrices"] = args.basis_layers * len(LLAMA_7B_STACKS)
    out["basis_scale"] = args.basis_scale
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=[*PRESETS, "tiny"], default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="dots_no_batch")
    parser.add_argument("--basis-layers", type=int, default=32)
    parser.add_argument("--basis-scale", type=float, default=1.0)
    parser.add_argument("--skip-basis", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    figures = {"targets": TARGETS, **train_figures(args)}
    if not args.skip_basis:
        figures.update(basis_figures(args))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
