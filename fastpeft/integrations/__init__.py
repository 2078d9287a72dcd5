"""fastpeft models in training frameworks.

* ``pretrained_save``: a transformers model with a fastpeft adapter gets a ``save_pretrained``
  that writes the adapter in its native format -- PEFT's for LoRA and prompt / prefix /
  P-tuning, AdapterHub's for bottleneck adapters -- (attached when the adapter is installed,
  removed by ``merge_and_unload`` / ``unload``), so HF ``Trainer``'s checkpoints hold the
  adapter only.
* ``transformers_trainer.enable_adapter_checkpoints(trainer)``: the one line a ``Trainer``
  needs to load those checkpoints (``resume_from_checkpoint``, ``load_best_model_at_end``).
* ``adapter_checkpoint.load_adapter_weights``: copy a saved adapter into a model's existing
  adapter in place (what resuming needs, with any training loop), for every adapter type.

accelerate needs nothing: ``accelerator.prepare`` (DDP, ``mixed_precision``) works on a
fastpeft model as on any model.
"""

from fastpeft.integrations.adapter_checkpoint import is_adapter_checkpoint, load_adapter_weights
from fastpeft.integrations.transformers_trainer import enable_adapter_checkpoints

__all__ = ["enable_adapter_checkpoints", "is_adapter_checkpoint", "load_adapter_weights"]
