"""Memory at scale, measured on paper: ahead-of-time lower + compile of cljax's own train
step, OSF basis build and greedy generation for LLaMA-2-7B / T5-large with abstract
arrays on ``JAX_NUM_CPU_DEVICES`` fake CPU devices, and ``compiled.memory_analysis()``.

Everything goes through the project's code: the family's model class built abstractly
(``nnx.eval_shape``), the method's ``setup`` / ``optimizer`` (the published per-method
settings, OSF at rank fraction 0.5), ``parallel``'s rules, ``loop.make_transform`` /
``loop.make_train_step`` with the loop's shardings, ``subspace.lower_build_bases`` and
the generation module's jitted greedy loop.

Figures per device, GiB (peak = arguments + outputs - aliased + temporaries):
  step_peak_gib, opt_state_total_gib, opt_state_per_device_gib, bases_build_peak_gib,
  generate_peak_gib; ``compiles``: compilations of the sharded step over 3 steady steps
  of the same method and mesh on the family's ``tiny`` preset (real arrays: a 7B step
  cannot execute here).

Usage:
  python bench/scale.py --model llama2-7b --method osf --mesh fsdp=8 [--batch 8]
      [--seq 1024] [--remat full] [--what train,bases,generate] [--json]
  python bench/scale.py --matrix experiments/results/bench/scale.txt
(``--mesh data=2,fsdp=4``; ``--batch`` is global, default one sequence per data-parallel
device.) The CPU compiler overstates bf16 temporaries; accelerators' figures are lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

GIB = 2**30
MODELS = {"llama2-7b": ("llama", "llama-2-7b"), "t5-large": ("t5", "t5-large")}
METHODS = ("osf", "gorp", "seqft", "olora")
MATRIX_MESHES = ("fsdp=8", "fsdp=16", "data=2,fsdp=4", "fsdp=4,tensor=2")
FIELDS = (
    "step_peak_gib",
    "opt_state_total_gib",
    "opt_state_per_device_gib",
    "bases_build_peak_gib",
    "generate_peak_gib",
    "compiles",
)


def parse_mesh(text: str) -> dict[str, int]:
    """``fsdp=8`` / ``data=2,fsdp=4`` -> {"data": 1, "fsdp": .., "tensor": ..}."""
    shape = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.replace("x", ",").split(","):
        name, _, size = part.strip().partition("=")
        if name not in shape or not size.isdigit():
            raise SystemExit(f"--mesh {text!r}: parts are data=N, fsdp=N, tensor=N")
        shape[name] = int(size)
    return shape


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    parser.add_argument("--method", choices=METHODS, default="osf")
    parser.add_argument("--mesh", default="fsdp=8")
    parser.add_argument("--batch", type=int, default=0, help="global rows (0: one per device)")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence / source length")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--what", default="train,bases,generate")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gen-prompt", type=int, default=2048)
    parser.add_argument("--gen-new", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--matrix", default="", help="run the issue's matrix, write a table")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one config


def peak_gib(compiled: Any) -> float:
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return round(total / GIB, 2)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cljax import parallel, published
    from cljax.cl import loop
    from cljax.cl.backbone import get_family
    from cljax.cl.methods import get_method
    from cljax.config import for_method
    from cljax.data.batching import Batch
    from cljax.models import generate
    from cljax.models.layers import DTypePolicy
    from cljax.optim.osf import resolve_ranks, select_targets
    from cljax.optim.subspace import SubspaceBasis, lower_build_bases, plan_widths

    family_name, preset = MODELS[args.model]
    family = get_family(family_name)
    base_cfg = published.llama2_7b(1) if family_name == "llama" else published.t5_large(1)
    cfg = for_method(base_cfg, args.method)
    if args.method == "osf":  # the setting: half of every targeted matrix frozen
        cfg.method.options = {**cfg.method.options, "rank_rule": "fraction"}
    mesh_shape = parse_mesh(args.mesh)
    mesh = parallel.make_mesh(mesh_shape)
    rules = parallel.rules_with(cfg.run.rules)
    rows = parallel.data_parallel_size(mesh, rules)
    batch_rows = args.batch or rows
    policy = DTypePolicy(cfg.model.param_dtype, cfg.model.compute_dtype)
    model_cfg = family.config_class.preset(preset, policy=policy, remat=args.remat)
    method = get_method(
        args.method,
        dict(cfg.method.options),
        family,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.train.seed,
    )

    def build():
        rngs = nnx.Rngs(params=0, dropout=1)
        model = family.model_class(model_cfg, rngs=rngs)
        method.setup(model, rngs)
        method.prepare(1, model, rngs)
        return model

    model = nnx.eval_shape(build)
    state_sh = parallel.state_shardings(nnx.state(model), mesh, rules)
    nnx.update(
        model,
        jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            nnx.state(model),
            state_sh,
        ),
    )
    graphdef, params, rest = nnx.split(model, method.trainable(), ...)
    out: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "mesh": args.mesh,
        "devices": mesh.size,
        "batch": batch_rows,
        "seq": args.seq,
        "remat": args.remat,
        "params_gib": round(
            sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model))) / GIB, 2
        ),
    }
    what = set(args.what.split(","))

    bases = None
    if args.method == "osf":
        matrices = select_targets(nnx.state(model, nnx.Param), method.targets)
        ranks = resolve_ranks(matrices, 0.5)
        calls = lower_build_bases(matrices, ranks, mesh)
        if "bases" in what:
            # one call per matrix stack: every targeted weight and every finished basis
            # is live throughout, plus the largest call's work space
            started = time.perf_counter()
            analyses = [c.compile().memory_analysis() for c in calls.values()]
            live = sum(m.argument_size_in_bytes + m.output_size_in_bytes for m in analyses)
            temp = max(m.temp_size_in_bytes for m in analyses)
            out["bases_build_peak_gib"] = round((live + temp) / GIB, 2)
            out["bases_compile_s"] = round(time.perf_counter() - started, 1)
        infos = {name: c.out_info for name, c in calls.items()}
        bases = {}
        for name, x in matrices.items():
            left_plan, right_plan = plan_widths(x.shape, np.asarray(ranks[name]))
            info = infos[name]
            bases[name] = SubspaceBasis(
                jax.ShapeDtypeStruct(info.left.shape, info.left.dtype, sharding=info.left.sharding),
                np.broadcast_to(left_plan.complement, x.shape[:-2]),
                jax.ShapeDtypeStruct(
                    info.right.shape, info.right.dtype, sharding=info.right.sharding
                ),
                np.broadcast_to(right_plan.complement, x.shape[:-2]),
            )

    steps = 1000
    if "train" in what:
        with parallel.use_mesh(mesh, rules):
            if bases is not None:
                # the state's shapes: the transform's init over traced sides (the real
                # bases are built by the task's basis build, measured above)
                def init(params, sides):
                    method.bases = {
                        n: b._replace(left=sides[n][0], right=sides[n][1]) for n, b in bases.items()
                    }
                    return loop.make_transform(cfg, method, 1, params, steps).init(params)

                sides = {n: (b.left, b.right) for n, b in bases.items()}
                opt_abstract = jax.eval_shape(init, params, sides)
                method.bases = bases
            tx = loop.make_transform(cfg, method, 1, params, steps)
            if bases is None:
                opt_abstract = jax.eval_shape(tx.init, params)
            opt_sh = parallel.derived_shardings(opt_abstract, params, mesh)
            opt_state = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                opt_abstract,
                opt_sh,
            )
            shardings = (loop.shardings_of(params), opt_sh, loop.shardings_of(rest))
            step = loop.make_train_step(family, method, tx, graphdef, shardings)
            batch = abstract_batch(family_name, batch_rows, args.seq, mesh, rules, Batch)
            arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), method.arrays)
            started = time.perf_counter()
            compiled = step.lower(
                params, opt_state, rest, batch, jax.random.key(0), arrays
            ).compile()
            out["step_compile_s"] = round(time.perf_counter() - started, 1)
        out["step_peak_gib"] = peak_gib(compiled)
        leaves = jax.tree.leaves(opt_state)
        out["opt_state_total_gib"] = round(sum(x.size * x.dtype.itemsize for x in leaves) / GIB, 2)
        out["opt_state_per_device_gib"] = round(
            sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
            / GIB,
            3,
        )
        out["compiles"] = steady_compiles(args, cfg, mesh, rules)

    if "generate" in what:
        eval_model = nnx.eval_shape(build)
        nnx.update(
            eval_model,
            jax.tree.map(
                lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                nnx.state(eval_model),
                state_sh,
            ),
        )
        eval_graphdef, eval_state = nnx.split(eval_model)
        row_sh = parallel.batch_sharding(mesh, 2, rules)
        ids = jax.ShapeDtypeStruct((args.gen_batch, args.gen_prompt), jnp.int32, sharding=row_sh)
        fn = generate._llama_greedy if family_name == "llama" else generate._t5_greedy
        with parallel.use_mesh(mesh, rules):
            started = time.perf_counter()
            compiled = fn.lower(
                eval_graphdef,
                eval_state,
                ids,
                ids,
                jnp.int32(args.gen_new),
                jnp.zeros((1,), jnp.int32),
                capacity=generate.bucket_size(args.gen_new),
                pad_id=0,
            ).compile()
            out["generate_compile_s"] = round(time.perf_counter() - started, 1)
        out["generate_peak_gib"] = peak_gib(compiled)
    return out


def abstract_batch(family_name, rows, seq, mesh, rules, batch_cls) -> Any:
    import jax
    import jax.numpy as jnp

    from cljax import parallel

    sh = parallel.batch_sharding(mesh, 2, rules)

    def array(length, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((rows, length), dtype, sharding=sh)

    if family_name == "llama":
        return batch_cls(
            array(seq), array(seq), array(seq), array(seq, jnp.float32), None, None, None
        )
    target = 64  # the published 50 label tokens, bucketed
    return batch_cls(
        array(seq),
        array(seq),
        array(target),
        array(target, jnp.float32),
        array(target),
        array(target),
        None,
    )


def steady_compiles(args, cfg, mesh, rules) -> int:
    """Compilations of the sharded step over 3 steps of the same method, mesh and code
    path on the family's ``tiny`` preset (the 7B step cannot execute here)."""
    import jax
    import numpy as np
    from flax import nnx

    from cljax import parallel
    from cljax.cl import loop
    from cljax.cl.backbone import get_family
    from cljax.cl.methods import get_method
    from cljax.data.batching import Batch

    family = get_family(MODELS[args.model][0])
    model_cfg = family.config_class.preset("tiny", remat=args.remat)
    rngs = nnx.Rngs(params=0, dropout=1)
    model = family.model_class(model_cfg, rngs=rngs)
    options = dict(cfg.method.options)
    if args.method == "gorp":
        options["update_proj_gap"] = 2  # a projector refresh within the 3 steps
    method = get_method(args.method, options, family, weight_decay=0.0, seed=0)
    method.setup(model, rngs)
    with parallel.use_mesh(mesh, rules):
        parallel.shard_module(model, mesh, rules)
        method.prepare(1, model, rngs)
        parallel.shard_module(model, mesh, rules)
        method.begin_task(1, model, lambda: [])
        graphdef, params, rest = nnx.split(model, method.trainable(), ...)
        tx = loop.make_transform(cfg, method, 1, params, 10)
        opt_sh = loop.optimizer_shardings(tx, params, mesh)
        opt_state = loop.init_optimizer(tx, params, opt_sh)
        step = loop.make_train_step(
            family,
            method,
            tx,
            graphdef,
            (loop.shardings_of(params), opt_sh, loop.shardings_of(rest)),
        )
        rows = parallel.data_parallel_size(mesh, rules)
        rng = np.random.default_rng(0)
        ids = rng.integers(3, model_cfg.vocab_size, (rows, 8)).astype(np.int32)
        ones = np.ones_like(ids)
        if MODELS[args.model][0] == "llama":
            batch = Batch(ids, ones, ids, ones.astype(np.float32), None, None, None)
        else:
            batch = Batch(ids, ones, ids, ones.astype(np.float32), ids, ones, None)
        batch = loop.device_batch(batch, mesh, rules)
        for i in range(3):
            params, opt_state, _ = step(
                params, opt_state, rest, batch, jax.random.key(i), method.arrays
            )
        jax.block_until_ready(params)
    return step._cache_size()


# --------------------------------------------------------------------------- matrix


def table(rows: list[dict[str, Any]]) -> str:
    columns = ("model", "method", "mesh", *FIELDS)
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(str(row.get(c, "-")) for c in columns))
    return "\n".join(lines)


def run_matrix(path: str) -> None:
    rows = []
    for model in MODELS:
        for method in METHODS:
            for mesh in MATRIX_MESHES:
                what = "train,bases,generate" if method == "osf" else "train"
                if method == "seqft":
                    what = "train,generate"
                command = [
                    sys.executable,
                    __file__,
                    "--model", model,
                    "--method", method,
                    "--mesh", mesh,
                    "--seq", "1024" if model == "llama2-7b" else "512",
                    "--what", what,
                    "--json",
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"failed: {' '.join(command)}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    text = (
        "# python bench/scale.py --matrix " + path + "\n"
        "# per-device GiB from compiled.memory_analysis() on fake CPU devices; one sequence\n"
        "# per data-parallel device (LLaMA 1024 tokens, T5 512 source + 64 target), remat full,\n"
        "# float32 master weights with bf16 matmuls; generation: 64 x 2048 prompts + 50 tokens\n\n"
        + table(rows)
        + "\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.matrix:
        run_matrix(args.matrix)
        return
    devices = math.prod(parse_mesh(args.mesh).values())
    # JAX reads this once, when it initialises: before the first jax import below.
    os.environ["JAX_NUM_CPU_DEVICES"] = str(devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    row = measure(args)
    if args.json:
        print(json.dumps(row))
    else:
        print(table([row]))


if __name__ == "__main__":
    main()
