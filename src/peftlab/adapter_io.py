"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format.

Explained in the chapter *LoRA* (book/chapters/lora.md).

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``;
tensor keys are ``base_model.model.<module path>.lora_A.weight`` (r × in) and
``...lora_B.weight`` (out × r). A DoRA adapter (``"use_dora": true``; the chapter *LoRA
variants*, book/chapters/variants.md) adds ``...lora_magnitude_vector`` (out), the key
PEFT writes (no ``.weight`` suffix). An adapter saved here loads with
``peft.PeftModel.from_pretrained`` and one saved by PEFT loads here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.files import atomic_write_all
from peftlab.adapters import add_lora, lora_layers
from peftlab.lora import LoRALinear, lora_scaling
from peftlab.targets import (
    find_targets,
    matches_target,
    modules_outside_lora,
    normalize_excludes,
    resolve_targets,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# How load_adapter treats each field of PEFT's LoraConfig (peft 0.21.2). A field in none
# of these three is refused when set to anything but an empty value, so that a field a
# later PEFT adds cannot change the computation unnoticed (tests/test_adapter_io.py
# enumerates LoraConfig's fields against them).

# Read and implemented: the rank, scaling, dropout and target selection.
_HANDLED = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",  # DoRA: a magnitude vector per layer (peftlab.dora)
        "target_modules",
        "task_type",  # read by "all-linear" (a SEQ_CLS head is left out, as in PEFT)
        "init_lora_weights",  # checked below (_INIT_ACCEPTED)
        "exclude_modules",  # names left out of target_modules, matched as PEFT does
    }
)

# Accepted whatever their value: none changes what a loaded adapter computes.
_IGNORED = frozenset(
    {
        "auto_mapping",  # metadata: which PEFT class saved it
        "peft_version",  # metadata
        "base_model_name_or_path",  # metadata (the base model is the caller's)
        "revision",  # metadata (the base model's revision)
        "inference_mode",  # whether PEFT freezes the adapter; the weights are the same
        "megatron_core",  # read only together with megatron_config, refused below
        "qalora_group_size",  # read only together with use_qalora, refused below
        "runtime_config",  # runtime only (GPU offload); PEFT drops it from saved configs
        "eva_config",  # EVA's init data: used once at init, the file holds the result
    }
)

# Implemented only at their default: a non-default value changes the computation (a
# different layer, a variant, other ranks or scalings, extra trained tensors, or a base
# weight that PEFT rewrites when it loads the adapter), so it is refused, not half-loaded.
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# init_lora_weights values that only set the factors' starting values, which the saved
# tensors replace: PEFT re-runs the init when it loads an adapter, and these leave the
# base weight alone. The others ("pissa..."/"corda...", "olora", "loftq", "lora_ga") rewrite
# the base weight when PEFT loads the adapter, and "mica" is a LoRA variant: refused.
_INIT_ACCEPTED = (True, False, "gaussian", "orthogonal", "eva")

_EMPTY = (None, False, {}, [], "")


def _keys(name: str) -> tuple[str, str]:
    return f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"


def _magnitude_key(name: str) -> str:
    # PEFT saves the DoRA magnitude under its ModuleDict's name, the adapter name and the
    # parameter ("weight") stripped (as checked against a PEFT 0.21.2 save).
    return f"{_PREFIX}{name}.lora_magnitude_vector"


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Targets that select exactly ``names`` under PEFT's rules: the short names if they
    do, else a regex.

    Note: full names as a list are not exact either ("blk.0" also selects "x.blk.0"); a
    regex of the escaped full names is (PEFT full-matches a str target).
    """
    short = sorted({n.rpartition(".")[2] for n in names})
    selected = [
        n for n, m in modules_outside_lora(model) if n and matches_target(n, short)
    ]
    if sorted(selected) == sorted(names):
        return short
    return "|".join(re.escape(n) for n in sorted(names))


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's LoRA factors and config to ``directory`` in PEFT's format; return
    the folder.

    Note: everything is validated and both files are written to temporary names first;
    then each is moved into place (:func:`peftlab.files.atomic_write_all`). An existing
    adapter is thus never left with a partly written file (a crash between the two renames
    can leave a new config beside the old weights; the loader's key and shape checks
    refuse such a pair).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layer to save; call add_lora() first")
    settings = {(m.r, m.alpha, m.rslora, _dropout_p(m), m.use_dora) for _, m in layers}
    if len(settings) != 1:
        raise ValueError(
            "all LoRA layers must share r, alpha, rslora, dropout and use_dora to be saved; "
            f"found {settings}"
        )
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(
            f"LoRA layers {merged[:3]} are merged; unmerge() them before saving"
        )
    r, alpha, rslora, dropout, use_dora = settings.pop()
    names = [n for n, _ in layers]
    tensors = {}
    for name, m in layers:
        key_a, key_b = _keys(name)
        tensors[key_a] = m.lora_A.detach().contiguous().cpu()
        tensors[key_b] = m.lora_B.detach().contiguous().cpu()
        if use_dora:
            magnitude = m.lora_magnitude_vector.detach().contiguous().cpu()
            tensors[_magnitude_key(name)] = magnitude
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
        or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": use_dora,
        "target_modules": _target_modules(model, names),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_all(
        {
            directory / WEIGHTS_NAME: lambda tmp: save_file(
                tensors, tmp, metadata={"format": "pt"}
            ),
            directory / CONFIG_NAME: lambda tmp: Path(tmp).write_text(
                json.dumps(config, indent=2)
            ),
        }
    )
    return directory


def _dropout_p(layer: LoRALinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}"
        )
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{path} lacks the field {field!r}")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: r must be a positive int, got {r!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
    ):
        raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(config.get("use_dora", False), bool):
        raise ValueError(
            f"{path}: use_dora must be true or false, got {config['use_dora']!r}"
        )
    for field, default in _UNSUPPORTED.items():
        value = config.get(field, default)
        if value != default and not (default is None and value in ({}, [], "")):
            raise ValueError(
                f"{path}: {field}={value!r} is not supported here (only {default!r})"
            )
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _INIT_ACCEPTED):
        raise ValueError(
            f"{path}: init_lora_weights={init!r} is not supported here (only one of "
            f"{list(_INIT_ACCEPTED)}: PEFT re-runs that init when loading, changing the base)"
        )
    known = _HANDLED | _IGNORED | set(_UNSUPPORTED)
    for field, value in config.items():
        if field not in known and not any(value is e or value == e for e in _EMPTY):
            raise ValueError(
                f"{path}: unknown field {field}={value!r}; only empty values are accepted "
                "for fields this loader does not know"
            )
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` (in place) and return it.

    A model without LoRA layers is first wrapped per the config (``add_lora`` with its
    ``target_modules``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``use_dora``); an already wrapped one must agree with the config and is filled.

    Note: the adapter's keys must be exactly the model's LoRA layers and every shape must
    fit; otherwise ValueError, and the model is not touched. (PEFT only warns about
    missing keys and leaves B at zero, which silently gives the base model.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {str(directory)!r} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"adapter folder {str(directory)!r} has no {name}")
    config = _read_config(directory / CONFIG_NAME)
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    r, alpha = config["r"], config["lora_alpha"]
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_dora = config.get("use_dora", False)

    layers = lora_layers(model)
    if layers:
        scaling = lora_scaling(alpha, r, rslora)
        for name, m in layers:
            if m.merged:
                raise ValueError(
                    f"LoRA layer {name!r} is merged; unmerge() it before loading an adapter"
                )
            if m.r != r or not math.isclose(m.scaling, scaling, rel_tol=1e-12):
                raise ValueError(
                    f"LoRA layer {name!r} has r={m.r}, scaling={m.scaling:g}; the adapter has r={r}, "
                    f"scaling={scaling:g}"
                )
            if m.use_dora != use_dora:
                raise ValueError(
                    f"LoRA layer {name!r} has use_dora={m.use_dora}; the adapter has "
                    f"use_dora={use_dora}"
                )
        targets = resolve_targets(
            model, config["target_modules"], config.get("task_type")
        )
        exclude = normalize_excludes(config.get("exclude_modules"))
        stray = [
            n
            for n, _ in layers
            if not matches_target(n, targets)
            or (exclude is not None and matches_target(n, exclude))
        ]
        if stray:
            raise ValueError(
                f"LoRA layers {stray[:3]} are not selected by the adapter's target_modules {targets!r}"
            )
        shapes = {n: (m.r, m.in_features, m.out_features) for n, m in layers}
    else:
        names = find_targets(
            model,
            config["target_modules"],
            config.get("task_type"),
            exclude_modules=config.get("exclude_modules"),
        )
        shapes = {}
        for n in names:
            base = model.get_submodule(n)
            shapes[n] = (r, base.in_features, base.out_features)

    expected = {}
    for n, (rank, fan_in, fan_out) in shapes.items():
        key_a, key_b = _keys(n)
        expected[key_a] = (rank, fan_in)
        expected[key_b] = (fan_out, rank)
        if use_dora:
            expected[_magnitude_key(n)] = (fan_out,)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not match the model: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs {shape}"
            )
        if not tensors[key].is_floating_point():
            raise ValueError(
                f"adapter tensor {key!r} has dtype {tensors[key].dtype}, expected a float dtype"
            )

    if not layers:
        # the names found above ("all-linear" resolved), as an exact full-match regex
        exact = "|".join(re.escape(n) for n in names)
        add_lora(model, exact, r, alpha, dropout, rslora, use_dora)
    with torch.no_grad():
        for name, m in lora_layers(model):
            key_a, key_b = _keys(name)
            m.lora_A.copy_(tensors[key_a])
            m.lora_B.copy_(tensors[key_b])
            if use_dora:
                # the trained magnitude replaces add_lora's initial ‖W0‖
                m.lora_magnitude_vector.copy_(tensors[_magnitude_key(name)])
    return model
