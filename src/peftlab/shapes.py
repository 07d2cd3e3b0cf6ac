"""The shapes of LLaMA models: widths, depths, heads and vocabulary, and the parameter
counts that follow from them, for the published sizes or any Hugging Face ``LlamaConfig``.

Used by the memory estimate of the chapter *Memory savings* (book/chapters/memory.md,
:mod:`peftlab.memory`) and by the per-GPU shares of *QLoRA across GPUs*
(book/chapters/fsdp.md, :mod:`peftlab.sharding`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peftlab.checks import positive_int
from peftlab.targets import LLAMA_LINEARS

__all__ = ["LLAMA", "LlamaShape"]


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a LLaMA-architecture model: all a memory estimate needs to know
    about
    it."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    ffn: int
    vocab: int = 32000
    n_kv_heads: int | None = None
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in ("d_model", "n_layers", "n_heads", "ffn", "vocab"):
            positive_int(getattr(self, f), f)
        if self.n_kv_heads is not None:
            positive_int(self.n_kv_heads, "n_kv_heads")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections (d_model unless grouped-query
        attention)."""
        heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        return heads * (self.d_model // self.n_heads)

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the seven linear layers of one block."""
        d, f, kv = self.d_model, self.ffn, self.kv_dim
        return {
            "q_proj": (d, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, d),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }

    @property
    def linear_params(self) -> int:
        """Parameters in the blocks' linear layers (what QLoRA quantizes)."""
        return self.n_layers * sum(o * i for o, i in self.block_linears().values())

    def trained_numels(
        self, method: str, r: int = 64, targets: Iterable[str] = LLAMA_LINEARS
    ) -> list[int]:
        """Elements of each trained tensor: every parameter tensor for ``"full"``, the
        LoRA ``A`` (r × in) and ``B`` (out × r) of ``targets`` in every block otherwise.

        Note: 8-bit optimizer states depend on each tensor's size (one absmax per block
        of
        256; tensors below 4096 elements keep 32-bit states), not only on the total.
        """
        if method == "full":
            embeddings = [self.vocab * self.d_model] * (
                1 if self.tied_embeddings else 2
            )
            block = [o * i for o, i in self.block_linears().values()]
            norms = [self.d_model] * 2
            return embeddings + (block + norms) * self.n_layers + [self.d_model]
        linears = self.block_linears()
        adapters = [n for t in targets for n in (r * linears[t][1], linears[t][0] * r)]
        return adapters * self.n_layers

    def lora_params(self, r: int, targets: Iterable[str] = LLAMA_LINEARS) -> int:
        """LoRA parameters with rank ``r`` on ``targets`` of every block: r × (in + out)
        per matrix."""
        linears = self.block_linears()
        return self.n_layers * sum(r * (linears[t][0] + linears[t][1]) for t in targets)

    @property
    def other_params(self) -> int:
        """Embeddings, ``lm_head`` and the RMSNorm weights (kept in 16 bits by QLoRA)."""
        embeddings = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.n_layers + 1) * self.d_model

    @property
    def n_params(self) -> int:
        return self.linear_params + self.other_params

    @classmethod
    def from_config(cls, config: Any, name: str = "config") -> LlamaShape:
        """From a ``transformers.LlamaConfig`` (or anything with its attribute names)."""
        try:
            return cls(
                name=name,
                d_model=config.hidden_size,
                n_layers=config.num_hidden_layers,
                n_heads=config.num_attention_heads,
                ffn=config.intermediate_size,
                vocab=config.vocab_size,
                n_kv_heads=getattr(config, "num_key_value_heads", None),
                tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            )
        except AttributeError as err:
            raise TypeError(
                "model must be a LLaMA name, a LlamaShape or a config with "
                "hidden_size, num_hidden_layers, "
                f"num_attention_heads, intermediate_size and vocab_size; {err}"
            ) from None


LLAMA: dict[str, LlamaShape] = {
    "llama-7b": LlamaShape("llama-7b", 4096, 32, 32, 11008),
    "llama-13b": LlamaShape("llama-13b", 5120, 40, 40, 13824),
    "llama-33b": LlamaShape("llama-33b", 6656, 60, 52, 17920),
    "llama-65b": LlamaShape("llama-65b", 8192, 80, 64, 22016),
}
"""LLaMA-1 shapes (Touvron et al. 2023, Table 2), untied embeddings, vocabulary 32,000."""
