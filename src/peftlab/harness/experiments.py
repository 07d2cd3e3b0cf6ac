"""The training loop: one seeded finetuning run of the tiny pretrained LLaMA
(:func:`finetune`), and many (:func:`sweep`).

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

One run adapts the shipped checkpoint (:func:`peftlab.harness.pretrained.load_pretrained`)
to the downstream text (CPython's C headers, :mod:`peftlab.harness.textdata`) with full
finetuning, LoRA or QLoRA, as its :class:`peftlab.harness.config.RunConfig` says, and
returns a :class:`peftlab.harness.results.RunResult`. The same loop serves the recorded
studies (:mod:`peftlab.harness.studies`) and the QLoRA chapter's three-way comparison
(*QLoRA*, book/chapters/qlora.md). Runs are cached on disk, keyed by their settings
(:func:`peftlab.harness.config.cache_key`), under a folder the caller names.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from peftlab.devices import Stopwatch, sixteen_bit_dtype
from peftlab.files import atomic_write
from peftlab.harness import analysis, pretrained, textdata
from peftlab.harness.config import (
    TARGETS,
    RunConfig,
    cache_key,
    lr_factor,
    run_texts,
)
from peftlab.harness.results import RunResult
from peftlab.adapters import add_lora, count_parameters
from peftlab.loraplus import create_loraplus_optimizer
from peftlab.measure import measure_step
from peftlab.paged import PagedAdamW
from peftlab.pissa import apply_pissa
from peftlab.prepare import prepare_qlora


@lru_cache(maxsize=2)
def _base_model(is_pretrained: bool) -> torch.nn.Module:
    # Built once per process and deep-copied per run: building a LlamaForCausalLM costs
    # more than a short finetuning. The untrained model is the pretraining seed's
    # initialisation, i.e. the very weights the shipped checkpoint started from.
    return pretrained.load_pretrained() if is_pretrained else pretrained.build_model(0)


@torch.no_grad()
def _loss_on(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = pretrained.lm_loss(model, *batch).item()
    model.train(was_training)
    return loss


def _prepare(config: RunConfig) -> tuple[torch.nn.Module, torch.dtype]:
    """The model a run trains, on ``config.device``, and the dtype its frozen base
    computes in."""
    model = copy.deepcopy(_base_model(config.pretrained))
    dtype = (
        sixteen_bit_dtype(config.device)
        if config.precision == "16-bit"
        else torch.float32
    )
    # LoRA's A is drawn on the CPU before the move, so CPU and GPU runs start from the
    # same A.
    with torch.random.fork_rng(devices=[]):
        # CPU only: CUDA RNG untouched
        torch.random.default_generator.manual_seed(config.seed)
        if config.method == "full":
            model.requires_grad_(True)
        else:
            # As in the paper, the base is loaded in 16 bits and its linear layers
            # quantized from there.
            model.to(dtype)
            targets = list(TARGETS[config.targets])
            if config.method == "qlora":
                prepare_qlora(
                    model,
                    targets,
                    r=config.r,
                    alpha=config.alpha,
                    dropout=config.dropout,
                    rslora=config.rslora,
                    use_dora=config.use_dora,
                    init=config.init,
                    compute_dtype=dtype,
                    kernels=config.kernels,
                )
            else:
                add_lora(
                    model,
                    targets,
                    config.r,
                    config.alpha,
                    config.dropout,
                    rslora=config.rslora,
                    use_dora=config.use_dora,
                )
                if config.init == "pissa":
                    apply_pissa(model)
    return model.to(config.device).train(), dtype


def _step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_grad_norm: float,
) -> torch.Tensor:
    """One training step: forward, backward, clip the gradient norm, update; returns the
    gradient's norm before clipping."""
    loss = pretrained.lm_loss(model, *batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], max_grad_norm
    )
    opt.step()
    return norm


def _optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    kind = PagedAdamW if config.optimizer == "paged_adamw" else torch.optim.AdamW
    options: dict[str, Any] = {"optim_bits": 8} if config.optim_bits == 8 else {}
    if config.loraplus_ratio != 1.0:
        return create_loraplus_optimizer(
            model,
            kind,
            lr=config.lr,
            loraplus_lr_ratio=config.loraplus_ratio,
            weight_decay=0.0,
            **options,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return kind(params, lr=config.lr, weight_decay=0.0, **options)


def _run(
    config: RunConfig, progress: bool, stop_after: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    texts = run_texts(config.train_bytes)
    device = torch.device(config.device)
    held, train_eval, pre, val = (
        tuple(
            t.to(device)
            for t in textdata.spaced_windows(
                texts[name], config.eval_windows, config.seq_len
            )
        )
        for name in ("held_out", "train", "pretraining", "validation")
    )
    model, dtype = _prepare(config)
    base_weights = analysis.linear_weights(model) if config.method == "full" else {}
    count = count_parameters(model)
    row: dict[str, Any] = {"compute_dtype": str(dtype).removeprefix("torch.")}
    if config.measure_memory:  # on a copy, so that training is not disturbed
        probe = copy.deepcopy(model)
        probe_opt = _optimizer(config, probe)
        batch = tuple(
            t.to(device)
            for t in textdata.random_batch(
                texts["train"],
                config.batch_size,
                config.seq_len,
                torch.Generator().manual_seed(config.seed),
            )
        )
        row["memory"] = measure_step(
            probe,
            lambda: _step(probe, probe_opt, batch, config.max_grad_norm),
            probe_opt,
        ).as_dict()
        del probe, probe_opt
    opt = _optimizer(config, model)
    # each group's own peak rate (LoRA+ gives B a larger one), scaled by the schedule
    peaks = [group["lr"] for group in opt.param_groups]
    gen = torch.Generator().manual_seed(config.seed)
    row["initial_held_out_loss"] = _loss_on(model, held)
    row["initial_pretraining_loss"] = _loss_on(model, pre)
    row["initial_validation_loss"] = _loss_on(model, val)
    # the DoRA paper's ΔM/ΔD along training, at every curve point (not for a 4-bit base,
    # whose pretrained weight is no longer at hand)
    track = config.method != "qlora"
    start = analysis.trained_weights(model, config.method) if track else {}
    direction = (
        [[0, analysis.magnitude_direction_of(model, config.method, start)]]
        if track
        else []
    )
    curve = [
        [
            0,
            row["initial_held_out_loss"],
            _loss_on(model, train_eval),
            row["initial_validation_loss"],
        ]
    ]
    last_step = config.steps if stop_after is None else stop_after
    steps = range(last_step)
    if progress:
        steps = tqdm(
            steps,
            desc=f"{config.method} r={config.r} seed={config.seed}",
            leave=False,
            mininterval=0.5,
        )
    # synchronizes a GPU before reading the clock: its kernels run asynchronously
    watch = Stopwatch(device)
    grad_norms = []
    for step in steps:
        x, y = textdata.random_batch(
            texts["train"], config.batch_size, config.seq_len, gen
        )
        factor = lr_factor(config, step)
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * factor
        with watch:
            norm = _step(model, opt, (x.to(device), y.to(device)), config.max_grad_norm)
        grad_norms.append(norm)
        if (
            config.eval_every
            and (step + 1) % config.eval_every == 0
            and step + 1 < last_step
        ):
            curve.append(
                [
                    step + 1,
                    _loss_on(model, held),
                    _loss_on(model, train_eval),
                    _loss_on(model, val),
                ]
            )
            if track:
                direction.append(
                    [
                        step + 1,
                        analysis.magnitude_direction_of(model, config.method, start),
                    ]
                )
    row["seconds"] = watch.seconds
    row["seconds_per_step"] = watch.seconds / last_step
    row["held_out_loss"] = _loss_on(model, held)
    row["train_loss"] = _loss_on(model, train_eval)
    row["pretraining_loss"] = _loss_on(model, pre)
    row["validation_loss"] = _loss_on(model, val)
    row["trainable"] = count.trainable
    row["total"] = count.total
    last = [row["held_out_loss"], row["train_loss"], row["validation_loss"]]
    row["curve"] = curve + [[last_step, *last]]
    if track:
        direction.append(
            [last_step, analysis.magnitude_direction_of(model, config.method, start)]
        )
        row["magnitude_direction"] = direction
    norms = torch.stack(grad_norms).float().cpu()
    row["first_grad_norm"] = norms[0].item()
    row["mean_grad_norm"] = norms.mean().item()
    row["effective_rank"], row["update_norm"] = analysis.update_statistics(
        model, base_weights
    )
    adapter = {}
    if config.method != "full":
        adapter = {
            name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters()
            if name.endswith(("lora_A", "lora_B", "lora_magnitude_vector"))
        }
    return row, adapter


def finetune(
    config: RunConfig,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Run (or load from ``cache_dir``) one finetuning; return what it measured.

    ``stop_after`` ends training after that many of ``config.steps`` updates, with the
    learning-rate schedule still laid over all of them: the first ``stop_after`` steps of
    the full run, exactly, which is how a recorded run is re-checked by a short one
    (:func:`peftlab.harness.recorded.verify`). Such a partial run is never cached.

    The result's ``config`` holds the settings as asked (a run shared with another
    spelling, such as rsLoRA at r = 1, is run once). An adapted run's trained
    ``lora_A``/``lora_B`` are stored beside it in ``cache_dir`` (or kept in the result's
    ``adapter`` without one): see :func:`load_run_adapter`.

    Note: losses are measured on ``eval_windows`` windows spread evenly over each text
    (:func:`peftlab.harness.textdata.spaced_windows`), the same windows for every run, so
    runs compare on identical data.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    asked = config
    config = config.normalized()
    key = cache_key(config)

    def result(measured: dict[str, Any], **extra: Any) -> RunResult:
        row = {**asdict(config), "scaling": config.scaling, "key": key, **measured}
        return replace(RunResult.from_json(row), config=asked, **extra)

    if stop_after is not None:
        if (
            isinstance(stop_after, bool)
            or not isinstance(stop_after, int)
            or not 1 <= stop_after <= config.steps
        ):
            raise ValueError(
                f"stop_after must be an int in [1, steps={config.steps}], got {stop_after!r}"
            )
        return result(_run(config, progress, stop_after)[0])
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"cache_dir must be a folder, got the file {str(folder)!r}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.json"
        if path.is_file() and (
            config.method == "full" or path.with_suffix(".safetensors").is_file()
        ):
            cached = RunResult.from_json(json.loads(path.read_text()))
            return replace(cached, config=asked, cached=True)
    measured, adapter = _run(config, progress)
    run = result(measured)
    if folder is not None:
        if adapter:
            from safetensors.torch import save_file

            atomic_write(
                path.with_suffix(".safetensors"), lambda tmp: save_file(adapter, tmp)
            )
        text = json.dumps(replace(run, config=config).to_json(), indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return run
    return replace(run, adapter=adapter or None)


def load_run_adapter(
    run: RunResult, cache_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The trained ``lora_A``/``lora_B`` tensors of a run, by parameter name: kept in the
    result, or read from the cache it was stored in.

    Not a PEFT adapter folder: for those, :func:`peftlab.adapter_io.load_adapter`.
    """
    if run.adapter is not None:
        return dict(run.adapter)
    if cache_dir is None:
        raise ValueError("cache_dir is needed: this run's adapter was stored on disk")
    path = Path(cache_dir) / f"{run.key}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter file {path} not found (only LoRA and QLoRA runs have one)"
        )
    from safetensors.torch import load_file

    return load_file(str(path))


def sweep(
    configs: Sequence[RunConfig],
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Run every config (cached ones are loaded) and return their results, in order."""
    configs = list(configs)
    runs: Iterable[RunConfig] = configs
    if progress:
        runs = tqdm(configs, desc="sweep", total=len(configs), mininterval=0.5)
    return [finetune(c, cache_dir, progress=False) for c in runs]
