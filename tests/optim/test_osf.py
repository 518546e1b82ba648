"""OSF transform: exactness of the constraint, both orientations, PEFT as external oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.optim import subspace as ss
from cljax.optim.osf import osf, osf_bases, osf_projection

RNG = np.random.default_rng(1)
LR, WD, STEPS = 1e-2, 0.1, 50
TARGETS = [r"^stack/kernel$", r"^wide/kernel$", r"^square/kernel$"]


def flax_params() -> dict:
    """Flax-orientation kernels (d_in, d_out): a stacked tall one, a wide one, a square one."""
    return {
        "stack": {"kernel": RNG.normal(size=(2, 12, 8)).astype(np.float32)},
        "wide": {"kernel": RNG.normal(size=(6, 10)).astype(np.float32)},
        "square": {"kernel": RNG.normal(size=(8, 8)).astype(np.float32)},
        "norm": {"scale": RNG.normal(size=(8,)).astype(np.float32)},
    }


PARAMS = flax_params()
GRADS = [
    jax.tree.map(lambda p: RNG.normal(size=p.shape).astype(np.float32), PARAMS)
    for _ in range(STEPS)
]


def to_torch_layout(tree: dict) -> dict:
    """The same weights as PyTorch (d_out, d_in) matrices: swap the last two axes."""
    return jax.tree.map(lambda x: np.swapaxes(x, -1, -2) if x.ndim >= 2 else x, tree)


def train(tx: optax.GradientTransformation, params: dict, grads: list) -> tuple[dict, list]:
    """Run the given gradients through ``tx`` (one jitted update); final params, updates."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates_seen = []
    for g in grads:
        updates, state = step(g, state, params)
        updates_seen.append(updates)
        params = optax.apply_updates(params, updates)
    return params, updates_seen


def torch_view_highs(kernel_flax: np.ndarray, k: int):
    """U_h (d_out, k), V_h (k, d_in) of W = kernel^T (methods.md notation), per stacked matrix."""
    w = np.swapaxes(kernel_flax, -1, -2).astype(np.float64)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    return u[..., :, :k], vt[..., :k, :]


# wide (k = 4 >= 6/2) and square (5 >= 8/2) store complement bases on their complete sides
RANKS = {"stack/kernel": 3, "wide/kernel": 4, "square/kernel": 5}


@pytest.fixture(scope="module")
def trained():
    """50 AdamW + weight decay steps of OSF, in Flax and in PyTorch orientation."""
    out = {}
    for layout, params, grads in (
        ("flax", PARAMS, GRADS),
        ("torch", to_torch_layout(PARAMS), [to_torch_layout(g) for g in GRADS]),
    ):
        bases = osf_bases(params, RANKS, targets=TARGETS)
        final, updates = train(osf(LR, bases, weight_decay=WD), params, grads)
        out[layout] = (params, bases, final, updates)
    return out


def test_k_zero_is_exactly_adamw():
    bases = osf_bases(PARAMS, 0.0, targets=TARGETS)
    _, got = train(osf(LR, bases, weight_decay=WD), PARAMS, GRADS[:3])
    _, want = train(optax.adamw(LR, weight_decay=WD), PARAMS, GRADS[:3])
    for g, w in zip(got, want, strict=True):
        jax.tree.map(np.testing.assert_array_equal, g, w)


def test_constraint_holds_after_50_adamw_steps(trained):
    params, _, final, _ = trained["flax"]
    for name, k in RANKS.items():
        key = name.split("/")[0]
        delta = np.swapaxes(np.asarray(final[key]["kernel"]) - params[key]["kernel"], -1, -2)
        u_h, v_h = torch_view_highs(params[key]["kernel"], k)  # dW (d_out, d_in)
        norm = np.linalg.norm(delta)
        assert norm > 0.1, name  # it did train
        assert np.linalg.norm(np.swapaxes(u_h, -1, -2) @ delta) <= 1e-5 * norm, name
        assert np.linalg.norm(delta @ np.swapaxes(v_h, -1, -2)) <= 1e-5 * norm, name
    # untargeted parameters train as plain AdamW
    assert np.linalg.norm(final["norm"]["scale"] - params["norm"]["scale"]) > 0.1


def test_both_orientations_give_transposed_updates(trained):
    _, _, final_flax, upd_flax = trained["flax"]
    _, _, final_torch, upd_torch = trained["torch"]
    for a, b in zip(upd_flax[-1:], upd_torch[-1:], strict=True):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, to_torch_layout({"t": y})["t"], atol=1e-6),
            a,
            b,
        )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, to_torch_layout({"t": y})["t"], atol=1e-5),
        final_flax,
        final_torch,
    )


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_inputs_in_frozen_input_directions_keep_their_outputs(trained, layout):
    params, bases, final, _ = trained[layout]
    for name in RANKS:
        key = name.split("/")[0]
        before, after = params[key]["kernel"], np.asarray(final[key]["kernel"])
        frozen_in = ss.high_columns(ss.input_side(bases[name], layout))  # (d_in, k) per slice
        flat_before = before.reshape(-1, *before.shape[-2:])
        flat_after = after.reshape(-1, *after.shape[-2:])
        for q, w0, w1 in zip(frozen_in, flat_before, flat_after, strict=True):
            x = RNG.normal(size=(5, q.shape[1])) @ q.T  # 5 inputs in span(V_h)
            apply = (lambda w, x: x @ w) if layout == "flax" else (lambda w, x: x @ w.T)
            y0, y1 = apply(w0, x), apply(w1, x)
            np.testing.assert_allclose(y1, y0, atol=1e-5 * np.linalg.norm(y0))
            # a generic input does see the change (the test is not vacuous)
            z = RNG.normal(size=(5, q.shape[0]))
            assert np.linalg.norm(apply(w1, z) - apply(w0, z)) > 1e-2


def test_k_equal_r_gives_zero_update():
    full = {name: min(PARAMS[name.split("/")[0]]["kernel"].shape[-2:]) for name in RANKS}
    bases = osf_bases(PARAMS, full, targets=TARGETS)
    _, updates = train(osf(LR, bases, weight_decay=WD), PARAMS, GRADS[:2])
    for u in updates:
        for key in ("stack", "wide", "square"):
            assert np.all(np.asarray(u[key]["kernel"]) == 0), key
        assert np.any(np.asarray(u["norm"]["scale"]) != 0)


def test_block_mode_and_untargeted_freeze():
    bases = osf_bases(PARAMS, RANKS, targets=TARGETS)
    final, _ = train(osf(LR, bases, mode="block", untargeted="freeze"), PARAMS, GRADS[:5])
    w0 = PARAMS["square"]["kernel"].T
    u_h, v_h = torch_view_highs(PARAMS["square"]["kernel"], RANKS["square/kernel"])
    delta = np.asarray(final["square"]["kernel"]).T - w0
    # block removes only U_h^T dW V_h^T; the one-sided products stay
    assert np.linalg.norm(u_h.T @ delta @ v_h.T) <= 1e-5 * np.linalg.norm(delta)
    assert np.linalg.norm(u_h.T @ delta) > 1e-2 * np.linalg.norm(delta)
    np.testing.assert_array_equal(final["norm"]["scale"], PARAMS["norm"]["scale"])
    with pytest.raises(ValueError, match="untargeted"):
        osf(LR, bases, untargeted="keep")
    with pytest.raises(ValueError, match="mode"):
        osf_projection(bases, mode="one_sided")


def test_bad_input_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"'attn/q_proj' matches no parameter"):
        osf_bases(PARAMS, 0.5, targets=[r"^stack/kernel$", "attn/q_proj"])
    with pytest.raises(ValueError, match=r"'norm/scale' has shape \(8,\).*matrix"):
        osf_bases(PARAMS, 0.5, targets=["norm"])
    with pytest.raises(
        ValueError, match=r"'wide/kernel' is 7, outside \[0, min\(m, n\)\] = \[0, 6\]"
    ):
        osf_bases(PARAMS, {**RANKS, "wide/kernel": 7}, targets=TARGETS)
    with pytest.raises(ValueError, match=r"'stack/kernel' is \[-1, 2\]"):
        osf_bases(PARAMS, {**RANKS, "stack/kernel": np.array([-1, 2])}, targets=TARGETS)
    nan_params = jax.tree.map(np.copy, PARAMS)
    nan_params["wide"]["kernel"][1, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite.*'wide/kernel'"):
        osf_bases(nan_params, RANKS, targets=TARGETS)
    bases = osf_bases(PARAMS, RANKS, targets=TARGETS)
    with pytest.raises(ValueError, match="'square/kernel'.*does not fit"):
        osf(LR, bases).init({**PARAMS, "square": {"kernel": np.zeros((8, 9), np.float32)}})
    tx = osf(LR, bases)
    jax.jit(lambda state: state, donate_argnums=0)(tx.init(PARAMS))  # a donating step
    with pytest.raises(ValueError, match="freed by a step that donated"):
        tx.init(PARAMS)


def test_nnx_optimizer_on_a_stacked_flax_layer():
    """Paths from an nnx.State (Variables' ``.value`` dropped) and an nnx.Optimizer step."""
    from flax import nnx

    from cljax.models.layers import Linear

    class Net(nnx.Module):
        def __init__(self):
            self.proj = Linear(12, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0), stack=(2,))

    model = Net()
    before = np.asarray(model.proj.kernel[...])
    bases = osf_bases(nnx.state(model, nnx.Param), {"proj/kernel": 3}, targets=["^proj/kernel$"])
    optimizer = nnx.Optimizer(model, osf(LR, bases, weight_decay=WD), wrt=nnx.Param)
    x = jnp.asarray(RNG.normal(size=(4, 12)), jnp.float32)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: jnp.sum(jnp.tanh(jnp.einsum("bi,lio->lbo", x, m.proj.kernel[...])) ** 2)
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        step(model, optimizer)
    delta = np.swapaxes(np.asarray(model.proj.kernel[...]) - before, -1, -2)  # (L, d_out, d_in)
    u_h, v_h = torch_view_highs(before, 3)
    assert np.linalg.norm(delta) > 1e-3
    assert np.linalg.norm(np.swapaxes(u_h, -1, -2) @ delta) <= 1e-5 * np.linalg.norm(delta)
    assert np.linalg.norm(delta @ np.swapaxes(v_h, -1, -2)) <= 1e-5 * np.linalg.norm(delta)


# ----------------------------------------------------------------- PEFT external oracle

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def peft_model():
    """A small torch model with OSF (PEFT) on three Linear layers: (8 x 12), (12 x 8)
    and a square one with effective rank 0.75 (> r/2, so we store the complement)."""
    from peft import OSFConfig, get_peft_model

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(12, 8, bias=False)  # weight (8, 12)
            self.b = torch.nn.Linear(8, 12, bias=False)  # weight (12, 8)
            self.c = torch.nn.Linear(12, 12, bias=False)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    net = Net()
    weights = {n: getattr(net, n).weight.detach().numpy().copy() for n in "abc"}
    cfg = OSFConfig(effective_rank=0.3, target_modules=["a", "b", "c"], rank_pattern={"c": 0.75})
    return get_peft_model(net, cfg), weights


def test_bases_and_ranks_equal_peft_decomposition(peft_model):
    from peft.tuners.osf.utils import decompose_weight_matrix

    model, weights = peft_model
    flax_kernels = {n: {"kernel": w.T} for n, w in weights.items()}
    ranks = {f"{n}/kernel": (0.3 if n != "c" else 0.75) for n in weights}
    for name, w in weights.items():
        layer = getattr(model.base_model.model, name)
        peft_k = layer.effective_rank["default"]
        ours = osf_bases(flax_kernels, ranks[f"{name}/kernel"], targets=[f"^{name}/kernel$"])
        basis = ours[f"{name}/kernel"]
        ref = decompose_weight_matrix(torch.from_numpy(w), top_k=peft_k)
        u_high, v_high = ref["U_high"].numpy(), ref["V_high"].numpy()
        # rank: ours (PEFT float semantics) equals the rank PEFT chose for this layer
        out_cols = ss.high_columns(ss.output_side(basis, "flax"))[0]
        in_cols = ss.high_columns(ss.input_side(basis, "flax"))[0]
        assert out_cols.shape[1] == in_cols.shape[1] == peft_k == ref["rank_high"], name
        # bases: equal up to the sign of singular vectors -> compare projectors
        np.testing.assert_allclose(out_cols @ out_cols.T, u_high @ u_high.T, atol=1e-5)
        np.testing.assert_allclose(in_cols @ in_cols.T, v_high.T @ v_high, atol=1e-5)


def test_peft_sgd_step_satisfies_our_constraint(peft_model):
    model, weights = peft_model
    torch.manual_seed(1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    loss = model(torch.randn(16, 12)).square().sum()
    loss.backward()
    opt.step()
    for name, w in weights.items():
        layer = getattr(model.base_model.model, name)
        delta = layer.get_delta_weight("default").detach().numpy().astype(np.float64)  # (out, in)
        k = layer.effective_rank["default"]
        basis = osf_bases({"w": w.T}, {"w": k}, targets=["^w$"])["w"]
        projected = np.asarray(ss.project_complement(jnp.asarray(delta.T, jnp.float32), basis))
        assert np.linalg.norm(delta) > 1e-3, name
        # the PEFT change already lies in our complement: projecting it changes nothing
        np.testing.assert_allclose(projected, delta.T, atol=2e-5 * np.linalg.norm(delta))
