"""A tiny LLaMA-architecture byte-level language model, pretrained offline, and the script
that made it.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

The model is ``transformers.LlamaForCausalLM``, so its linear layers carry LLaMA's names
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``) and code written for it runs on a real LLaMA by changing how the model is
loaded. The vocabulary is the 256 byte values (:mod:`peftlab.harness.textdata`), so no
tokenizer is needed.

The shipped checkpoint ``peftlab/data/tiny_llama.safetensors`` was made by::

    python -m peftlab.harness.pretrained --out src/peftlab/data/tiny_llama.safetensors

(the defaults below; about 80 minutes on one CPU thread) on the ``"stdlib"`` corpus of
:mod:`peftlab.harness.textdata`; ``tiny_llama.json`` beside it records the config, the
exact command, the data's SHA-256 hashes, the Python, torch and transformers versions,
the wall time and the loss curves. Use :func:`load_pretrained`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from peftlab.files import atomic_write_all
from peftlab.harness import textdata

DATA_DIR = (
    Path(__file__).resolve().parents[1] / "data"
)  # src/peftlab/data: package data
CHECKPOINT = DATA_DIR / "tiny_llama.safetensors"

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": textdata.VOCAB_SIZE,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
"""LLaMA-1 layout at toy size: d_model 192, 4 layers, 6 heads of 32, SwiGLU FFN 512 (8/3 ·
192, a multiple of 64 as LLaMA's 11008 is, so every weight row is whole blocks of 64 for
4-bit quantization), untied embeddings, byte vocabulary: 1.87 M parameters, 7.5 MB in
float32."""

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 4500,
    "batch_size": 16,
    "seq_len": 256,
    "lr": 2e-3,
    "warmup": 200,
    "weight_decay": 0.1,
    "seed": 0,
}
"""Settings of the shipped checkpoint (also the command-line defaults)."""


def _progress(iterable: Iterable, enabled: bool, **tqdm_kw: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, mininterval=0.5, **tqdm_kw)


SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
"""Config fields the command line may override (``--hidden-size`` …)."""


def _sha256(data: torch.Tensor) -> str:
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def tiny_llama_config(**overrides: Any):
    """``transformers.LlamaConfig`` for the tiny model; keyword arguments override
    :data:`TINY_LLAMA`."""
    from transformers import LlamaConfig

    unknown = set(overrides) - set(TINY_LLAMA)
    if unknown:
        raise ValueError(
            f"unknown config overrides {sorted(unknown)}; allowed: {sorted(TINY_LLAMA)}"
        )
    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def build_model(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised (untrained) tiny LLaMA; ``seed`` fixes its initial weights."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_pretrained(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The pretrained tiny LLaMA from ``path`` (default: the shipped checkpoint), in
    eval mode.

    The config is read from the JSON file beside the checkpoint. Every tensor in the
    file must match a parameter of the model and vice versa; a mismatch raises
    ``ValueError``.
    """
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    path = Path(CHECKPOINT if path is None else path)
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"checkpoint file {p} not found (path={str(path)!r})"
            )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    meta = json.loads(meta_path.read_text())
    model = LlamaForCausalLM(tiny_llama_config(**meta["config"]))
    state = load_file(str(path))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"checkpoint {path} does not match the model: "
            f"missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def checkpoint_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON record beside a checkpoint: config, command, versions, losses."""
    meta_path = Path(CHECKPOINT if path is None else path).with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint record {meta_path} not found")
    return json.loads(meta_path.read_text())


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats per byte (``y`` holds the targets, already
    shifted)."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 16,
    max_windows: int | None = None,
) -> float:
    """Mean next-byte loss (nats/byte) over non-overlapping windows of ``data``.

    An untrained model scores about ln 256 ≈ 5.55. The model's train/eval mode is restored
    afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in textdata.eval_batches(data, batch_size, seq_len, max_windows):
        total += lm_loss(model, x.to(device), y.to(device)).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def complete(model: torch.nn.Module, prompt: str, max_new_bytes: int = 80) -> str:
    """Greedy continuation of ``prompt``, byte by byte (a quick look at what the model
    learned)."""
    if not isinstance(max_new_bytes, int) or max_new_bytes < 1:
        raise ValueError(f"max_new_bytes must be a positive int, got {max_new_bytes!r}")
    device = next(model.parameters()).device
    ids = textdata.encode(prompt)[None].to(device)
    if ids.numel() == 0:
        raise ValueError("prompt must not be empty")
    limit = model.config.max_position_embeddings
    new = []
    for _ in range(max_new_bytes):
        logits = model(input_ids=ids[:, -limit:]).logits[0, -1]
        nxt = int(logits.argmax())
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return textdata.decode(new)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def pretrain(
    steps: int = PRETRAIN_DEFAULTS["steps"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    seq_len: int = PRETRAIN_DEFAULTS["seq_len"],
    lr: float = PRETRAIN_DEFAULTS["lr"],
    warmup: int = PRETRAIN_DEFAULTS["warmup"],
    weight_decay: float = PRETRAIN_DEFAULTS["weight_decay"],
    seed: int = PRETRAIN_DEFAULTS["seed"],
    eval_every: int = 500,
    eval_windows: int | None = None,
    progress: bool = True,
    corpus: str = "stdlib",
    final_eval_windows: int | None = None,
    **overrides: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Pretrain a tiny LLaMA on a pretraining ``corpus`` with AdamW; returns the model and
    a record of losses.

    Every ``eval_every`` steps the record gains the mean training loss since the last
    evaluation and the loss on the corpus's held-out split (``held_out_loss``) and on the
    outside texts (``outside_loss``: English and Python never trained on), each over at
    most ``eval_windows`` windows; the final evaluation over ``final_eval_windows`` (default:
    the whole texts, as the shipped record reports them; a small number keeps a quick
    trial run quick).

    Deterministic for a given seed, thread count and machine: the weights, the batch
    offsets and nothing else depend on ``seed``.

    Note: AdamW with betas (0.9, 0.95), gradient clipping at 1.0 and weight decay on
    matrices only, as LLaMA was trained; warm-up then cosine decay (:func:`lr_at`).
    """
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    train = textdata.pretraining_text("train", corpus)
    held = textdata.pretraining_text("held_out", corpus)
    outside = {kind: textdata.outside_text(kind) for kind in textdata.OUTSIDE_KINDS}
    model = build_model(seed, **overrides).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(seed)
    record: dict[str, Any] = {
        "untrained_held_out_loss": evaluate_loss(
            model, held, seq_len, batch_size, eval_windows
        ),
        "train_loss": [],
        "held_out_loss": [],
        "outside_loss": {kind: [] for kind in outside},
    }
    running = 0.0
    for step in _progress(range(steps), progress, desc="pretrain", total=steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x, y = textdata.random_batch(train, batch_size, seq_len, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            n = (step % eval_every) + 1
            windows = final_eval_windows if step + 1 == steps else eval_windows
            record["train_loss"].append([step + 1, running / n])
            record["held_out_loss"].append(
                [step + 1, evaluate_loss(model, held, seq_len, batch_size, windows)]
            )
            for kind, text in outside.items():
                record["outside_loss"][kind].append(
                    [step + 1, evaluate_loss(model, text, seq_len, batch_size, windows)]
                )
            running = 0.0
    record["final_held_out_loss"] = record["held_out_loss"][-1][1]
    record["final_outside_loss"] = {
        k: v[-1][1] for k, v in record["outside_loss"].items()
    }
    return model.eval(), record


def save_checkpoint(
    model: torch.nn.Module, path: str | os.PathLike, record: dict[str, Any]
) -> None:
    """Write ``path`` (safetensors, float32) and ``path.with_suffix('.json')`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
    }
    atomic_write_all(
        {
            path: lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
            path.with_suffix(".json"): lambda tmp: Path(tmp).write_text(
                json.dumps(record, indent=1) + "\n"
            ),
        }
    )


def command_line() -> argparse.ArgumentParser:
    """The parser of ``python -m peftlab.harness.pretrained`` (also reads a record's
    ``command`` back)."""
    parser = argparse.ArgumentParser(
        description="Pretrain the tiny byte-level LLaMA on the standard library's text."
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output .safetensors path (a .json is written beside it)",
    )
    for key, value in PRETRAIN_DEFAULTS.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(value), default=value
        )
    for key in SIZE_KEYS:
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help="model size override",
        )
    parser.add_argument(
        "--corpus", choices=textdata.PRETRAINING_CORPORA, default="stdlib"
    )
    parser.add_argument(
        "--eval-every", type=int, default=250, help="steps between held-out evaluations"
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=64,
        help="windows per evaluation during training (the last one uses every window)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (fixed for determinism)"
    )
    parser.add_argument(
        "--final-eval-windows",
        type=int,
        default=None,
        help="windows of the last evaluation (default: the whole texts)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m peftlab.harness.pretrained --out PATH [--steps N ...]``."""
    args = command_line().parse_args(argv)
    import transformers

    # Determinism: fixed thread count and deterministic kernels make reruns bit-identical
    # on one machine.
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    settings = {k: getattr(args, k) for k in PRETRAIN_DEFAULTS}
    sizes = {k: getattr(args, k) for k in SIZE_KEYS if getattr(args, k) is not None}
    start = time.perf_counter()
    model, losses = pretrain(
        **settings,
        **sizes,
        corpus=args.corpus,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        final_eval_windows=args.final_eval_windows,
        progress=not args.no_progress,
    )
    info = textdata.corpus_info("pretraining", args.corpus)
    train_text = textdata.pretraining_text("train", args.corpus)
    held_text = textdata.pretraining_text("held_out", args.corpus)
    record = {
        "config": {**TINY_LLAMA, **sizes},
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": "python -m peftlab.harness.pretrained "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            **settings,
            "threads": args.threads,
            "eval_every": args.eval_every,
            # None: each text whole (the final evaluation's default).
            "eval_windows": args.eval_windows,
            "final_eval_windows": args.final_eval_windows,
            "optimizer": "AdamW(betas=(0.9, 0.95))",
            "schedule": "linear warm-up, cosine to 10 %",
            "grad_clip": 1.0,
        },
        "data": {
            "source": info.source,
            "corpus": args.corpus,
            "python_version": info.python_version,
            "train_bytes": info.train_bytes,
            "held_out_bytes": info.held_out_bytes,
            "held_out_topics": list(info.held_out_documents),
            "sha256": {
                "train": _sha256(train_text),
                "held_out": _sha256(held_text),
                **{
                    k: _sha256(textdata.outside_text(k)) for k in textdata.OUTSIDE_KINDS
                },
            },
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": platform.machine(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        **losses,
    }
    save_checkpoint(model, args.out, record)
    print(
        f"wrote {args.out}: held-out loss {record['final_held_out_loss']:.3f} nats/byte "
        f"(untrained {record['untrained_held_out_loss']:.3f}), outside "
        + ", ".join(f"{k} {v:.3f}" for k, v in record["final_outside_loss"].items())
        + f" in {record['wall_seconds']} s"
    )


if __name__ == "__main__":
    main()
