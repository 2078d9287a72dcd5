"""The names of the files the adapter formats read and write, in one place: each format's
module takes its names from here. ``ADAPTER_FILE_NAMES`` (the adapter formats' files) is what
a save clears of other saves' files; ``SAVED_FILE_NAMES`` (those and the Trainer copy) is
every name a save journal may name."""

from __future__ import annotations

# Both formats' config (PEFT's LoraConfig / prompt-learning fields; AdapterHub's full config).
CONFIG_NAME = "adapter_config.json"
# PEFT's weights: safetensors, and the pickle older PEFT versions write.
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
# AdapterHub's weights.
HUB_WEIGHTS_NAME = "adapter.safetensors"
HUB_PICKLE_NAME = "pytorch_adapter.bin"
# fastpeft's state dict of a prompt encoder whose trainable weights PEFT's file lacks (a
# prefix MLP, a P-tuning MLP / LSTM: PEFT saves their output), written beside PEFT's files
# in the same save so that a checkpoint can be resumed; PEFT ignores it.
ENCODER_STATE_NAME = "fastpeft_prompt_encoder.safetensors"

ADAPTER_FILE_NAMES = frozenset({
    CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_PICKLE_NAME, HUB_WEIGHTS_NAME, HUB_PICKLE_NAME, ENCODER_STATE_NAME,
})

# transformers' SAFE_WEIGHTS_NAME: a transformers model's save_pretrained also writes the
# adapter's tensors here under the model's own keys, for HF Trainer to resume from
# (fastpeft.formats.trainer_copy). fastpeft's loaders never read it as an adapter.
TRAINER_COPY_NAME = "model.safetensors"
SAVED_FILE_NAMES = ADAPTER_FILE_NAMES | {TRAINER_COPY_NAME}
