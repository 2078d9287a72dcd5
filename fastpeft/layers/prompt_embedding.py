"""``PromptEmbedding``: the trainable virtual-token embeddings of prompt tuning (PEFT's
``PromptEmbedding``, same parameter, same inits)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens`` trainable embeddings of size ``token_dim``, prepended to a batch's
    input embeddings by the prompt-tuning forward.

    The parameter is ``embedding.weight``, ``[num_virtual_tokens, token_dim]``, float32 (as
    PEFT keeps it, whatever the model's dtype), initialised ``N(0, 1)`` (``nn.Embedding``).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=torch.float32)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    @torch.no_grad()
    def init_from_tokens(self, word_embeddings: nn.Module, token_ids: Sequence[int] | torch.Tensor) -> None:
        """Copy the word embeddings of ``token_ids`` (cycled, then cut to ``num_virtual_tokens``
        rows, as PEFT's TEXT init) into the virtual tokens, in float32."""
        ids = [int(i) for i in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
        if not ids:
            raise ValueError("prompt tuning init: the init text tokenizes to no token ids")
        vocab = word_embeddings.num_embeddings
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt tuning init: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
        ids = (ids * math.ceil(self.num_virtual_tokens / len(ids)))[: self.num_virtual_tokens]
        index = torch.tensor(ids, dtype=torch.long, device=word_embeddings.weight.device)
        self.embedding.weight.copy_(word_embeddings(index).float())

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompts for a batch: ``[batch_size, num_virtual_tokens, token_dim]`` in ``dtype``
        (a broadcast view of the one parameter; its gradient is the sum over the batch)."""
        return self.embedding.weight.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)
