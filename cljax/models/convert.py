"""Hugging Face checkpoints <-> cljax models, without torch.

One generic mechanism serves every model family. A family (registered with
``register_family``) says, as data, how its tensors are named:

* ``TensorRule(hf_name, path, transform, num_layers)`` maps one Hugging Face tensor
  name (``"model.layers.{layer}.self_attn.q_proj.weight"``) to one cljax state path
  (``"layers/attn/q_proj/kernel"``, its ``cljax.paths`` name in ``nnx.state(model)``), through a
  named, invertible ``transform`` (``"identity"``, ``"transpose"``). With
  ``num_layers=L`` the name has a ``{layer}`` placeholder and the L per-layer tensors
  are stacked along the leading ``layers`` axis of the cljax parameter.
* ``ModelFamily`` bundles the ``model_type`` of ``config.json`` with functions that
  parse / write the config, build the model, and give the rules for a config.

``load_hf_checkpoint(dir)`` reads ``config.json``, dispatches on its ``model_type``,
builds the model abstractly (no random init of the real weights), and fills every
parameter from ``*.safetensors`` (a sharded ``model.safetensors.index.json`` too),
read with the numpy API of ``safetensors`` (bfloat16 through ``ml_dtypes``).
``export_hf_checkpoint(model, cfg, dir)`` writes ``config.json`` + safetensors that
``transformers`` loads. A missing tensor, an unexpected tensor, a wrong shape or a bad
config field fails with an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from cljax import parallel
from cljax.errors import CheckpointError
from cljax.models.hf_names import LAYER, TRANSFORMS, TensorRule, Transform  # noqa: F401
from cljax.paths import path_to_str

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Everything the converter needs to know about one ``model_type``.

    config_class: the cljax config dataclass (export dispatches on it).
    config_from_hf: config.json dict -> cljax config; raises naming any bad field.
    config_to_hf: cljax config -> config.json dict (with ``model_type``, ``architectures``).
    build: (config, rngs) -> NNX model.
    name_map: config -> the TensorRules covering every parameter of the model.
    ignore: regexes of HF tensor names that carry no parameter (e.g. cached buffers).
    resolve_config: optional (config, tensors) -> config, for facts that only the tensors
        tell (T5: whether ``lm_head`` is tied); ``tensors`` has ``located`` (the HF names)
        and ``read(name)``. It runs before ``config_overrides`` and the name map.
    """

    model_type: str
    config_class: type
    config_from_hf: Callable[[dict[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    name_map: Callable[[Any], Sequence[TensorRule]]
    ignore: tuple[str, ...] = ()
    resolve_config: Callable[[Any, Any], Any] | None = None


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` loadable by its ``model_type``; returns it."""
    if family.model_type in FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family
    return family


def family_for_config(cfg: Any) -> ModelFamily:
    """The family whose config class is exactly ``cfg``'s type (a variant subclassing
    ``LlamaConfig`` is its own family, never exported as LLaMA)."""
    for family in FAMILIES.values():
        if type(cfg) is family.config_class:
            return family
    raise CheckpointError(
        f"no registered model family for config type {type(cfg).__name__}; "
        f"supported: {sorted(FAMILIES)}"
    )


def family_for(model_type: Any, where: str = CONFIG_FILE) -> ModelFamily:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{where}: unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_hf_config(directory: str | Path) -> tuple[ModelFamily, Any]:
    """Parse ``directory/config.json`` into (family, cljax config)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
    with open(path) as f:
        raw = json.load(f)
    family = family_for(raw.get("model_type"), str(path))
    try:
        cfg = family.config_from_hf(raw)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from err
    return family, cfg


def safetensors_index(directory: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (sharded index or plain files)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        located = {name: directory / file for name, file in weight_map.items()}
        for name, file in located.items():
            if not file.is_file():
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} maps to missing file {file.name}"
                )
        return located
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_FILE}")
    located: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name in located:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} is in both {located[name].name} "
                        f"and {file.name}"
                    )
                located[name] = file
    return located


class _TensorReader:
    """Reads tensors by name, keeping each safetensors file open once."""

    def __init__(self, located: Mapping[str, Path]):
        self.located = located
        self._handles: dict[Path, Any] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str) -> Any:
        file = self.located[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np").__enter__()
        return self._handles[file]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _flat_params(model_or_state: Any) -> dict[str, nnx.Variable]:
    """State path (``cljax.paths``) -> variable, for every nnx.Param of a model (or
    abstract model)."""
    state = nnx.state(model_or_state, nnx.Param)
    return {path_to_str(path): var for path, var in nnx.to_flat_state(state)}


def _expected_hf_shape(rule: TensorRule, cljax_shape: tuple[int, ...]) -> tuple[int, ...]:
    per_layer = cljax_shape[1:] if rule.num_layers is not None else cljax_shape
    view = np.broadcast_to(np.zeros((), np.float32), per_layer)
    return tuple(TRANSFORMS[rule.transform].to_hf(view).shape)


def _check_rules_cover(
    rules: Sequence[TensorRule], params: Mapping[str, nnx.Variable], model_type: str
) -> None:
    paths = [r.path for r in rules]
    unknown = sorted(set(paths) - set(params))
    if unknown:
        raise CheckpointError(
            f"{model_type} name map refers to cljax paths the model lacks: {unknown}"
        )
    uncovered = sorted(set(params) - set(paths))
    if uncovered:
        raise CheckpointError(
            f"cljax parameters with no HF name in the {model_type} map: {uncovered}"
        )
    for rule in rules:
        shape = tuple(params[rule.path].get_value().shape)
        if rule.num_layers is not None and (not shape or shape[0] != rule.num_layers):
            raise CheckpointError(
                f"cljax {rule.path!r} has shape {shape}; "
                f"rule expects {rule.num_layers} stacked layers"
            )


def load_state_from_tensors(
    abstract_model: nnx.Module,
    rules: Sequence[TensorRule],
    reader: _TensorReader,
    *,
    model_type: str,
    ignore: Iterable[str] = (),
    where: str = "checkpoint",
    mesh: Mesh | None = None,
    sharding_rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
) -> nnx.Module:
    """Fill every parameter of ``abstract_model`` (from ``nnx.eval_shape``) from HF
    tensors, cast to each parameter's dtype; returns the concrete model.

    With a ``mesh``, each tensor goes straight into its sharding (from the parameter's
    logical axes and ``sharding_rules``): every device receives only its shards
    (``jax.make_array_from_callback``; on several hosts each process fills only its
    own devices), so no device ever holds a whole model, and the host holds one
    tensor at a time."""
    params = _flat_params(abstract_model)
    shardings = {}
    if mesh is not None:
        flat_sh = nnx.to_flat_state(
            parallel.state_shardings(nnx.state(abstract_model, nnx.Param), mesh, sharding_rules)
        )
        shardings = {path_to_str(path): v.get_value() for path, v in flat_sh}
    _check_rules_cover(rules, params, model_type)
    used: set[str] = set()
    values: dict[str, jnp.ndarray] = {}
    for rule in rules:
        var = params[rule.path]
        target = var.get_value()
        expected = _expected_hf_shape(rule, tuple(target.shape))
        slices = []
        for name in rule.hf_names():
            if name not in reader.located:
                raise CheckpointError(
                    f"{where}: missing tensor {name!r} (for cljax parameter {rule.path!r})"
                )
            found = reader.shape(name)
            if found != expected:
                raise CheckpointError(
                    f"{where}: tensor {name!r} has shape {found}, expected {expected} "
                    f"(for cljax parameter {rule.path!r})"
                )
            slices.append(
                TRANSFORMS[rule.transform].to_cljax(reader.read(name)).astype(target.dtype)
            )
            used.add(name)
        array = np.stack(slices) if rule.num_layers is not None else slices[0]
        del slices
        if rule.path in shardings:
            host = np.asarray(array, dtype=target.dtype)
            values[rule.path] = jax.make_array_from_callback(
                host.shape, shardings[rule.path], lambda index, host=host: host[index]
            )
        else:
            values[rule.path] = jnp.asarray(array, dtype=target.dtype)
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(
        n for n in reader.located if n not in used and not any(p.search(n) for p in patterns)
    )
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors the {model_type} map does not use: {unexpected[:10]}"
        )
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    filled = []
    for path, var in flat:
        key = path_to_str(path)
        if key in values:
            var = var.replace(values[key])
        filled.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load_hf_checkpoint(
    directory: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    **config_overrides: Any,
) -> tuple[nnx.Module, Any]:
    """Load an HF checkpoint directory into a cljax model: returns (model, config).

    ``config_overrides`` replace fields of the parsed config (e.g. ``policy=DTypePolicy(
    "bfloat16", "bfloat16")``) before the model is built. With a ``mesh`` every tensor
    is placed directly into its sharding (see ``load_state_from_tensors``).
    """
    family, cfg = read_hf_config(directory)
    reader = _TensorReader(safetensors_index(directory))
    try:
        if family.resolve_config is not None:
            cfg = family.resolve_config(cfg, reader)
        if config_overrides:
            cfg = dataclasses.replace(cfg, **config_overrides)
        abstract = nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0)))
        model = load_state_from_tensors(
            abstract,
            family.name_map(cfg),
            reader,
            model_type=family.model_type,
            ignore=family.ignore,
            where=str(directory),
            mesh=mesh,
            sharding_rules=rules,
        )
    finally:
        reader.close()
    return model, cfg


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def hf_tensors_from_model(
    model: nnx.Module, rules: Sequence[TensorRule], *, model_type: str
) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array (parameter dtype) for every parameter of ``model``."""
    params = _flat_params(model)
    _check_rules_cover(rules, params, model_type)
    tensors: dict[str, np.ndarray] = {}
    for rule in rules:
        array = np.asarray(params[rule.path].get_value())
        to_hf = TRANSFORMS[rule.transform].to_hf
        per_layer = list(array) if rule.num_layers is not None else [array]
        for name, part in zip(rule.hf_names(), per_layer, strict=True):
            tensors[name] = np.ascontiguousarray(to_hf(part))
    return tensors


def export_hf_checkpoint(
    model: nnx.Module,
    cfg: Any,
    directory: str | Path,
    *,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index when the tensors
    exceed ``max_shard_bytes``) that ``transformers`` ``from_pretrained`` loads."""
    family = family_for_config(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from_model(model, family.name_map(cfg), model_type=family.model_type)
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump(family.config_to_hf(cfg), f, indent=2, sort_keys=True)
    metadata = {"format": "pt"}  # transformers refuses safetensors without this tag
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
        return directory
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(directory / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return directory


def _split_shards(
    tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None
) -> list[dict[str, np.ndarray]]:
    if max_shard_bytes is None:
        return [dict(tensors)]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


# ---------------------------------------------------------------------------------------
# LLaMA (transformers LlamaForCausalLM)
# ---------------------------------------------------------------------------------------


def llama_like_family(config_class: type) -> ModelFamily:
    """The converter's record of a LLaMA-like family (``LlamaConfig`` or a variant of it:
    its ``MODEL_TYPE``, the same tensor names, biases when the config has them)."""
    from cljax.models.llama import Llama, hf_name_map

    return ModelFamily(
        model_type=config_class.MODEL_TYPE,
        config_class=config_class,
        config_from_hf=config_class.from_hf_dict,
        config_to_hf=config_class.to_hf_dict,
        build=lambda cfg, rngs: Llama(cfg, rngs=rngs),
        name_map=hf_name_map,
        # Old checkpoints saved the rotary buffer; it is recomputed from the config.
        ignore=(r"\.rotary_emb\.inv_freq$",),
    )


def _register_llama() -> None:
    from cljax.models.llama import LlamaConfig

    register_family(llama_like_family(LlamaConfig))


_register_llama()


# ---------------------------------------------------------------------------------------
# T5 (transformers T5ForConditionalGeneration: T5 v1.0, v1.1, Flan-T5)
# ---------------------------------------------------------------------------------------


def _register_t5() -> None:
    from cljax.models.t5 import EMBED_COPIES, T5, T5Config, hf_name_map, resolve_hf_config

    register_family(
        ModelFamily(
            model_type="t5",
            config_class=T5Config,
            config_from_hf=T5Config.from_hf_dict,
            config_to_hf=T5Config.to_hf_dict,
            build=lambda cfg, rngs: T5(cfg, rngs=rngs),
            name_map=hf_name_map,
            ignore=(
                # Tied copies, checked by t5.resolve_hf_config (an untied lm_head is used).
                *(rf"^{re.escape(name)}$" for name in (*EMBED_COPIES, "lm_head.weight")),
                # Cross-attention has no position bias; transformers skips this tensor too.
                r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
            ),
            resolve_config=resolve_hf_config,
        )
    )


_register_t5()


# LLaMA-like variants register themselves (their config classes, the shared name map).
from cljax.models import mistral, qwen2  # noqa: E402, F401
