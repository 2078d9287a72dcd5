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

    def prompts(self) -> torch.Tensor:
        """The virtual-token embeddings, ``[num_virtual_tokens, token_dim]`` (float32)."""
        return self.embedding.weight

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompts for a batch: ``[batch_size, num_virtual_tokens, token_dim]`` in ``dtype``
        (computed once and broadcast; the gradient is the sum over the batch)."""
        return self.prompts().to(dtype).unsqueeze(0).expand(batch_size, -1, -1)


class PTuningEncoder(PromptEmbedding):
    """P-tuning's prompts (PEFT's ``PromptEncoder``: same parameter names, same inits): the
    embeddings ``E`` of the virtual tokens passed through a reparameterization, then used as
    prompt tuning uses its embeddings.

    ``"MLP"``: ``mlp_head = Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)``.
    ``"LSTM"``: a bidirectional ``lstm_head`` (``encoder_num_layers`` layers, hidden ``H``,
    ``encoder_dropout`` between them) over the sequence of virtual tokens, then ``mlp_head =
    Linear(2H, 2H) -> ReLU -> Linear(2H, D)``. ``merge()`` evaluates it once and stores the
    prompts as the embedding (what PEFT saves and its inference mode holds).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, reparameterization: str, hidden_size: int,
                 num_layers: int = 2, dropout: float = 0.0, device: torch.device | None = None) -> None:
        super().__init__(num_virtual_tokens, token_dim, device=device)
        kw = {"device": device, "dtype": torch.float32}
        self.reparameterization = reparameterization
        if reparameterization == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden_size, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, token_dim, **kw))
        elif reparameterization == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size, **kw), nn.ReLU(),
                                          nn.Linear(hidden_size, token_dim, **kw))
        else:
            raise ValueError(f"P-tuning reparameterization must be 'MLP' or 'LSTM', got {reparameterization!r}")

    @property
    def merged(self) -> bool:
        return not hasattr(self, "mlp_head")

    def prompts(self) -> torch.Tensor:
        weight = self.embedding.weight
        if self.merged:
            return weight
        if self.reparameterization == "LSTM":
            return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]
        return self.mlp_head(weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Store the computed prompts as the embedding and drop the reparameterization; the
        stored prompts keep the embedding's ``requires_grad``. Idempotent."""
        if self.merged:
            return
        trainable = self.embedding.weight.requires_grad
        prompts = self.prompts().clone()
        self.embedding = nn.Embedding.from_pretrained(prompts, freeze=not trainable)
        del self.mlp_head
        if hasattr(self, "lstm_head"):
            del self.lstm_head
