"""``PrefixEncoder``: the trainable per-layer key/value prefix of prefix tuning (PEFT's
``PrefixEncoder``: same parameters and names, same inits), and its fold into a stored prefix."""

from __future__ import annotations

import torch
import torch.nn as nn


class PrefixEncoder(nn.Module):
    """The prefix ``P``, ``[num_virtual_tokens, num_layers * 2 * token_dim]``: row ``t`` holds,
    for layer ``l``, the key of virtual token ``t`` at columns ``[2 l D, (2 l + 1) D)`` and its
    value at ``[(2 l + 1) D, (2 l + 2) D)`` (``D = token_dim = heads * head_dim``), PEFT's layout.

    Without ``prefix_projection``, ``P = embedding.weight``. With it (PEFT's
    reparameterization), ``P = transform(embedding.weight)``, ``transform`` being
    ``Linear(D, encoder_hidden_size) -> Tanh -> Linear(encoder_hidden_size, 2 L D)``.
    ``merge()`` evaluates that MLP once and stores ``P`` as the embedding (no MLP left: what
    PEFT's inference mode and its saved ``prompt_embeddings`` hold). Parameters are float32.
    ``init_weights="zero"`` zeroes the last linear (or the embedding): a no-op prefix.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        num_layers: int,
        *,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        init_weights: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.num_layers = num_layers
        width = num_layers * 2 * token_dim
        kw = {"device": device, "dtype": torch.float32}
        self.prefix_projection = prefix_projection
        if prefix_projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw)
            )
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **kw)
            if init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def prefix(self) -> torch.Tensor:
        """``P``, ``[num_virtual_tokens, num_layers * 2 * token_dim]`` (float32)."""
        weight = self.embedding.weight
        return self.transform(weight) if self.prefix_projection else weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the reparameterization MLP into a stored prefix: ``embedding.weight = P`` and
        ``transform`` removed, so the forward reads ``P`` with no MLP. The stored prefix keeps
        the embedding's ``requires_grad``. A no-op without ``prefix_projection``."""
        if not self.prefix_projection:
            return
        trainable = self.embedding.weight.requires_grad
        prefix = self.prefix()
        self.embedding = nn.Embedding.from_pretrained(prefix.clone(), freeze=not trainable)
        del self.transform
        self.prefix_projection = False

    def key_values(
        self, batch_size: int, num_heads: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix keys and values ``[batch_size, num_heads, num_virtual_tokens,
        head_dim]`` in ``dtype`` (PEFT's ``view(B, T, 2 L, H, hd).permute(2, 0, 3, 1, 4)``;
        computed once and broadcast over the batch)."""
        p = self.prefix().to(dtype)
        tokens = p.shape[0]
        kv = p.view(tokens, 2 * self.num_layers, num_heads, self.token_dim // num_heads).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.num_layers)]
