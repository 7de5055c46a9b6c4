"""Structural types of the model seams: what the engine needs from a tokenizer, a causal LM and a loaded model.

``load_model`` returns a ``LoadedModel`` (a transformers model with kvcalib's attention path installed and its
tokenizer); the rest of the engine only relies on the members below, so any object with them works (a wrapped or
remote model, a test double of the tokenizer). Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from kvcalib.calib.lm.registry import ModelSpec


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the engine uses (prompt layout, chunking, probes, decoding)."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def chat_template(self) -> str | None: ...

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        """Encode ``text``; the result has ``.input_ids`` (a list, or a tensor with ``return_tensors="pt"``)."""
        ...

    def decode(self, token_ids: Any, **kwargs: Any) -> str: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


class CausalLM(Protocol):
    """A transformers causal LM whose decoder accepts kvcalib's ``kvcalib_state`` cache (``lm.attention``)."""

    @property
    def config(self) -> Any: ...

    @property
    def generation_config(self) -> Any:
        """transformers' ``GenerationConfig`` (its ``eos_token_id`` joins the tokenizer's), or None."""
        ...

    def get_decoder(self) -> Any:
        """The decoder stack: ``(input_ids=, position_ids=, use_cache=, kvcalib_state=) -> .last_hidden_state``."""
        ...

    def get_output_embeddings(self) -> Any:
        """The LM head: hidden states (..., hidden) -> logits (..., vocab); has ``.weight`` (vocab, hidden)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...


class LanguageModel(Protocol):
    """A loaded model (``registry.LoadedModel``): the network, its tokenizer and its shape facts."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> CausalLM: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def spec(self) -> ModelSpec: ...
