"""Sharded QLoRA runs, launched from a notebook or a test: N processes, each one rank of
``torch.distributed`` (gloo on CPUs, NCCL on GPUs), trained with FSDP2 and compared with
one process fed the same global batches.

Explained in the chapter *QLoRA across GPUs* (book/chapters/fsdp.md).

:class:`Launch` starts ``python -m peftlab.harness.fsdp_run`` once per rank, as
``torchrun`` would, with one CPU thread each and a file in a temporary folder as the
rendezvous (no port to choose); the caller's code runs meanwhile, and leaving the block
kills any rank still running. Each rank writes what it measured as JSON and its rows of
the gradients and factors as safetensors: no pickle crosses a process boundary.
:func:`reference_run` is the one-process run the sharded one must equal.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftlab.devices import torch_threads
from peftlab.files import atomic_write
from peftlab.fsdp import (
    BYTE_PARAMS,
    expected_collective_bytes,
    CollectiveBytes,
    ShardableLinear4bit,
    fully_shard_qlora,
    rank_bytes,
    save_sharded_adapter,
    split_batch,
    unsharded_4bit_bytes,
)
from peftlab.harness.pretrained import load_pretrained
from peftlab.harness.textdata import downstream_text
from peftlab.prepare import prepare_qlora
from peftlab.qlora import Linear4bit

__all__ = [
    "Launch",
    "RunSpec",
    "build_model",
    "global_batches",
    "launch",
    "negative_control",
    "reference_run",
]

ENV_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class RunSpec:
    """A sharded run: the model, LoRA, the data and AdamW.

    ``pretrained``: the book's tiny LLaMA (:mod:`peftlab.harness.pretrained`) finetuned
    on windows of the downstream text (CPython's C headers); otherwise a random LLaMA of
    the widths below on random tokens (quick, and any shape, odd ones included).
    """

    pretrained: bool = True
    hidden: int = 64
    ffn: int = 128
    heads: int = 2
    layers: int = 2
    vocab: int = 255
    r: int = 8
    alpha: float = 16.0
    batch: int = 4  # the global batch: every rank gets batch / world_size rows
    seq: int = 64
    steps: int = 20
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    negative_control: bool = True


def build_model(spec: RunSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The spec's ``LlamaForCausalLM`` prepared by
    :func:`peftlab.prepare.prepare_qlora`, in training mode: the same model in every
    process (the pretrained weights, or a seeded random initialisation)."""
    torch.manual_seed(spec.seed)
    if spec.pretrained:
        model = load_pretrained()
    else:
        import transformers

        config = transformers.LlamaConfig(
            hidden_size=spec.hidden,
            intermediate_size=spec.ffn,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            num_hidden_layers=spec.layers,
            vocab_size=spec.vocab,
        )
        model = transformers.LlamaForCausalLM(config)
    prepare_qlora(model, r=spec.r, alpha=spec.alpha)
    return model.train().to(device)


def global_batches(spec: RunSpec) -> torch.Tensor:
    """``steps × batch × seq`` token ids, the same in every process (seeded): windows
    of the downstream text at random offsets, or random tokens."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    shape = (spec.steps, spec.batch)
    if not spec.pretrained:
        return torch.randint(0, spec.vocab, (*shape, spec.seq), generator=g)
    text = downstream_text("train").long()
    starts = torch.randint(0, text.numel() - spec.seq, shape, generator=g)
    return text[starts[..., None] + torch.arange(spec.seq)]


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference_run(spec: RunSpec) -> dict[str, Any]:
    """One process, the whole global batch each step: the losses, the LoRA gradients of
    every step (name -> list), the final factors and :func:`peftlab.fsdp.rank_bytes`."""
    # One thread, as each rank has: the ranks run beside it on a machine's few cores.
    with torch_threads(1):
        model = build_model(spec)
        params = _lora_params(model)
        opt = torch.optim.AdamW(params.values(), lr=spec.lr)
        losses, grads = [], {n: [] for n in params}
        for x in global_batches(spec):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            losses.append(loss.item())
            for n, p in params.items():
                grads[n].append(p.grad.detach().clone())
            opt.step()
            opt.zero_grad(set_to_none=False)
    factors = {n: p.detach().clone() for n, p in params.items()}
    return dict(
        losses=losses,
        grads=grads,
        factors=factors,
        bytes=rank_bytes(model, opt),
        model=model,
    )


def _original_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    # The unsharded model's 4-bit bytes, under the names ShardableLinear4bit gives them
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            q = m.weight
            parts = [q.packed]
            parts += (
                [q.absmax.codes, q.absmax.absmax2, q.absmax.offset]
                if q.double_quant
                else [q.absmax]
            )
            for key, t in zip(BYTE_PARAMS, parts):
                out[f"{name}.{key}"] = (
                    t.contiguous().reshape(-1).view(torch.uint8).clone()
                )
    return out


def negative_control(device: str = "cpu") -> dict[str, int]:
    """bitsandbytes' 4-bit weight stored as bfloat16 (``quant_storage``), through
    ``fully_shard`` and back: how many packed 16-bit words are bf16 NaN patterns, how
    many FSDP2's gather changed, and how many one float32 round trip (what a float-aware
    copy does) changes; ``error`` names what failed if FSDP2 refused the layer. A
    collective: every rank calls it."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False)
    layer = bnb.nn.Linear4bit(
        256,
        512,
        bias=False,
        compute_dtype=torch.float32,
        quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    layer.load_state_dict(linear.state_dict())
    layer = layer.to(device)  # bitsandbytes quantizes here
    before = layer.weight.data.view(torch.int16).clone()
    bits = before & 0x7FFF
    nan = ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)
    x = torch.randn(4, 256, device=device)
    y0 = layer(x)
    round_trip = before.view(torch.bfloat16).float().bfloat16().view(torch.int16)
    out = {
        "words": before.numel(),
        "nan_words": int(nan.sum()),
        "changed_by_round_trip": int((round_trip != before).sum()),
        # the word(s) the conversion writes for a NaN
        "round_trip_nan": ", ".join(
            sorted({f"0x{int(w) & 0xFFFF:04X}" for w in round_trip[nan].tolist()})
        ),
        "error": "",
    }
    wrapper = nn.Sequential(layer)
    try:
        fully_shard(wrapper)
        wrapper.unshard()
        after = wrapper[0].weight.data.view(torch.int16)
        out["changed_by_fsdp"] = int((after != before).sum())
        out["nan_words_changed_by_fsdp"] = int((after != before)[nan].sum())
        out["output_differs"] = int(not torch.equal(y0, wrapper(x)))
        wrapper.reshard()
    except Exception as err:  # noqa: BLE001 - a failure is a result, reported as such
        out["error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def _worker(rank: int, world: int, spec: RunSpec, out: Path) -> None:
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    model = build_model(spec, device)
    original = _original_bytes(model)
    fully_shard_qlora(model)
    expected = expected_collective_bytes(model, world)
    with unsharded_4bit_bytes(model) as gathered:
        differing = sum(int((gathered[k] != v).sum()) for k, v in original.items())
        compared = sum(v.numel() for v in original.values())
        same_keys = sorted(gathered) == sorted(original)
    params = _lora_params(model)
    opt = torch.optim.AdamW(params.values(), lr=spec.lr)
    losses, shards, traffic = [], {}, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, x in enumerate(global_batches(spec)):
        x = split_batch(x, rank, world).to(device)
        counter = CollectiveBytes()
        with counter:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        if traffic is None:
            traffic = dict(
                all_gather=counter.all_gather,
                reduce_scatter=counter.reduce_scatter,
                calls=counter.calls,
                dtypes=sorted(counter.dtypes),
                events=counter.events,
            )
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        for n, p in params.items():  # this rank's rows; the caller puts them together
            shards[f"grad.{step}.{n}"] = p.grad.to_local().detach().cpu().clone()
        opt.step()
        opt.zero_grad(set_to_none=False)
    result: dict[str, Any] = dict(
        rank=rank,
        world=world,
        losses=losses,
        traffic=traffic,
        expected=expected,
        bytes=rank_bytes(model, opt),
        gather=dict(differing=differing, compared=compared, same_keys=same_keys),
        n_4bit_layers=sum(isinstance(m, ShardableLinear4bit) for m in model.modules()),
    )
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        result["device_name"] = torch.cuda.get_device_name(device)
    for n, p in params.items():
        shards[f"factor.{n}"] = p.to_local().detach().cpu().clone()
    save_sharded_adapter(model, out / "adapter")
    if spec.negative_control:
        result["negative_control"] = negative_control(str(device))
    from safetensors.torch import save_file

    atomic_write(out / f"rank{rank}.safetensors", lambda tmp: save_file(shards, tmp))
    text = json.dumps(result)
    atomic_write(out / f"rank{rank}.json", lambda tmp: Path(tmp).write_text(text))


class Launch:
    """``world_size`` processes running ``spec`` sharded, one rank each, started on
    entering the ``with`` block; the block's own code runs meanwhile (the one-process
    reference, say). :meth:`wait` returns what they measured. Leaving the block kills
    every rank still running, so none outlives it, whatever happened inside.

    ``folder`` (an empty folder the caller owns, e.g. a ``tempfile.TemporaryDirectory``)
    receives every file, the rendezvous included. On a CPU the ranks use gloo and one
    thread each; on CUDA (``spec.device == "cuda"``) NCCL and one GPU each.
    """

    def __init__(
        self,
        spec: RunSpec,
        folder: str | os.PathLike,
        world_size: int = 2,
        timeout: float = 120.0,
    ) -> None:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
        if (
            isinstance(world_size, bool)
            or not isinstance(world_size, int)
            or world_size < 1
        ):
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if spec.batch % world_size:
            raise ValueError(
                f"the global batch of {spec.batch} rows does not divide over "
                f"{world_size} ranks"
            )
        self.spec, self.world_size, self.timeout = spec, world_size, timeout
        self.folder = Path(folder)
        self._procs: list[tuple[subprocess.Popen, Any]] = []
        self._start = 0.0

    def __enter__(self) -> Launch:
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / "rendezvous").exists():
            # a file store left by an earlier run would pair these ranks with its own
            raise ValueError(
                f"{self.folder} holds an earlier run: give an empty folder"
            )
        (self.folder / "spec.json").write_text(json.dumps(asdict(self.spec)))
        env = {**os.environ, **dict.fromkeys(ENV_THREADS, "1")}
        env.pop(
            "PEFTLAB_BOOK_BUILD", None
        )  # the ranks are scripts, not the book's kernels
        self._start = time.perf_counter()
        try:
            for rank in range(self.world_size):
                err = open(self.folder / f"rank{rank}.err", "w")  # noqa: SIM115
                command = [
                    sys.executable,
                    "-m",
                    "peftlab.harness.fsdp_run",
                    str(rank),
                    str(self.world_size),
                    str(self.folder),
                ]
                proc = subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=err
                )
                self._procs.append((proc, err))
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        for proc, err in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err.close()

    def wait(self) -> dict[str, Any]:
        """Wait for every rank; return ``ranks`` (what each measured, a list of dicts),
        the LoRA gradients of every step (``grads``: ``{"step.name": tensor}``) and the
        final factors, put together from the ranks' rows, the adapter folder, and the
        wall time. RuntimeError (every rank killed) if one fails or ``timeout`` passes,
        with the end of the failed rank's error output."""
        deadline = self._start + self.timeout
        while True:
            codes = [p.poll() for p, _ in self._procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                self._stop()
                tail = (self.folder / f"rank{failed[0]}.err").read_text()[-2000:]
                raise RuntimeError(
                    f"rank {failed[0]} exited with {codes[failed[0]]}:\n{tail}"
                )
            if all(c == 0 for c in codes):
                break
            if time.perf_counter() > deadline:
                self._stop()
                raise RuntimeError(
                    f"the ranks did not finish in time (exit codes {codes})"
                )
            time.sleep(0.05)
        seconds = time.perf_counter() - self._start
        return _results(self.folder, self.world_size, seconds)


def _results(folder: Path, world_size: int, seconds: float) -> dict[str, Any]:
    from safetensors.torch import load_file

    ranks = [
        json.loads((folder / f"rank{r}.json").read_text()) for r in range(world_size)
    ]
    # FSDP2 splits dim 0: rank r holds the rows from r·ceil(n/N) on, so the ranks' rows,
    # put end to end, are the whole tensor.
    parts = [load_file(folder / f"rank{r}.safetensors") for r in range(world_size)]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    grads = {
        k.removeprefix("grad."): v for k, v in whole.items() if k.startswith("grad.")
    }
    factors = {
        k.removeprefix("factor."): v
        for k, v in whole.items()
        if k.startswith("factor.")
    }
    return dict(
        ranks=ranks,
        grads=grads,
        factors=factors,
        adapter=folder / "adapter",
        seconds=seconds,
    )


def launch(
    spec: RunSpec,
    folder: str | os.PathLike,
    world_size: int = 2,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``spec`` sharded over ``world_size`` processes and return what
    :meth:`Launch.wait` returns."""
    with Launch(spec, folder, world_size, timeout) as run:
        return run.wait()


def _exit_with_parent() -> None:
    # A rank whose launcher died (a killed notebook kernel) would wait in a collective
    # for a peer that never comes: leave as soon as the parent is gone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _main(argv: list[str]) -> None:
    _exit_with_parent()
    rank, world, folder = int(argv[0]), int(argv[1]), Path(argv[2])
    torch.set_num_threads(1)
    spec = RunSpec(**json.loads((folder / "spec.json").read_text()))
    backend = "nccl" if spec.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),  # a collective a peer never joins
    )
    try:
        _worker(rank, world, spec, folder)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1:])
