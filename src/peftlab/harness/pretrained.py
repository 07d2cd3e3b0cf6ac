"""A tiny LLaMA-architecture byte-level language model, pretrained offline, and the script that made it.

Explained in the chapter *LoRA rank and alpha* (book/chapters/rank_alpha.md).

The model is ``transformers.LlamaForCausalLM``, so its linear layers carry LLaMA's names
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) and
code written for it runs on a real LLaMA by changing how the model is loaded. The vocabulary is
the 256 byte values (:mod:`peftlab.harness.textdata`), so no tokenizer is needed.

The shipped checkpoint ``peftlab/data/tiny_llama.safetensors`` was made by::

    python -m peftlab.harness.pretrained --out src/peftlab/data/tiny_llama.safetensors --steps 2000 --threads 1

on the CPython help topics; ``tiny_llama.json`` beside it records the config, the exact command,
the Python, torch and transformers versions, and the losses. Use :func:`load_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from peftlab.files import atomic_write_all
from peftlab.harness import textdata

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # src/peftlab/data: package data
CHECKPOINT = DATA_DIR / "tiny_llama.safetensors"

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": textdata.VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
"""LLaMA-1 layout at toy size: d_model 128, 4 layers, 4 heads of 32, SwiGLU FFN 352 (about 8/3 · 128
rounded up to a multiple of 32, as LLaMA rounds 8/3 · 4096 to 11008), untied embeddings, byte vocab."""

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 16,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup": 100,
    "weight_decay": 0.1,
    "seed": 0,
}
"""Settings of the shipped checkpoint (also the command-line defaults)."""


def _progress(iterable: Iterable, enabled: bool, **tqdm_kw: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, mininterval=0.5, **tqdm_kw)


def tiny_llama_config(**overrides: Any):
    """``transformers.LlamaConfig`` for the tiny model; keyword arguments override :data:`TINY_LLAMA`."""
    from transformers import LlamaConfig

    unknown = set(overrides) - set(TINY_LLAMA)
    if unknown:
        raise ValueError(f"unknown config overrides {sorted(unknown)}; allowed: {sorted(TINY_LLAMA)}")
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
    """The pretrained tiny LLaMA from ``path`` (default: the shipped checkpoint), in eval mode.

    The config is read from the JSON file beside the checkpoint. Every tensor in the file must match
    a parameter of the model and vice versa; a mismatch raises ``ValueError``.
    """
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    path = Path(CHECKPOINT if path is None else path)
    atomic_write_all({
        path: lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
        path.with_suffix(".json"): lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"),
    })


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m peftlab.harness.pretrained --out PATH [--steps N ...]``."""
    parser = argparse.ArgumentParser(description="Pretrain the tiny byte-level LLaMA on pydoc_data.topics.")
    parser.add_argument("--out", required=True, help="output .safetensors path (a .json is written beside it)")
    for key, value in PRETRAIN_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for determinism)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    import transformers

    # Determinism: fixed thread count and deterministic kernels make reruns bit-identical on one machine.
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    settings = {k: getattr(args, k) for k in PRETRAIN_DEFAULTS}
    start = time.perf_counter()
    model, losses = pretrain(**settings, eval_every=args.eval_every, progress=not args.no_progress)
    info = textdata.corpus_info("pretraining")
    record = {
        "config": TINY_LLAMA,
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": "python -m peftlab.harness.pretrained " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {**settings, "threads": args.threads, "optimizer": "AdamW(betas=(0.9, 0.95))",
                     "schedule": "linear warm-up, cosine to 10 %", "grad_clip": 1.0},
        "data": {"source": info.source, "train_bytes": info.train_bytes,
                 "held_out_bytes": info.held_out_bytes, "held_out_topics": list(info.held_out_documents)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "machine": platform.machine(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        **losses,
    }
    save_checkpoint(model, args.out, record)
    print(f"wrote {args.out}: held-out loss {record['final_held_out_loss']:.3f} nats/byte "
          f"(untrained {record['untrained_held_out_loss']:.3f}) in {record['wall_seconds']} s")


if __name__ == "__main__":
    main()
