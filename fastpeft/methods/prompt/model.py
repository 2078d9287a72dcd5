"""Prompt tuning and prefix tuning on a transformers model, in place (no wrapper object).

``inject_prompt`` adds the virtual-token module (``PromptEmbedding`` / ``PrefixEncoder``) to
the model as the submodule ``fastpeft_prompt_encoder`` and gives this one model object a
``forward`` (a ``PromptForward``) that does what PEFT's ``PeftModelForCausalLM`` /
``PeftModelForSequenceClassification`` / ``PeftModelForFeatureExtraction`` forward does
before calling the model's own forward, for a batch of ``B`` sequences of ``T`` tokens and
``N = num_virtual_tokens``:

* ``attention_mask`` ``[B, T]`` -> ``[B, N + T]`` (ones for the virtual tokens);
* prompt tuning: ``inputs_embeds = cat(prompts, embed(input_ids))``; ``labels`` get ``N``
  leading ``-100`` (causal LM); ``position_ids`` are dropped with a warning (PEFT); SEQ_CLS
  ``token_type_ids`` get ``N`` leading zeros, other tasks drop them with a warning;
* prefix tuning: the prefix keys/values are given as the model's key/value cache (a
  transformers ``DynamicCache``; an empty ``Cache`` passed in is filled in place), so each
  layer attends over ``N`` more keys and nothing else changes; ``position_ids + N``;
  ``token_type_ids`` dropped with a warning except for SEQ_CLS.

A call whose cache already holds tokens (a continuation: ``generate``'s decode steps, or a
forward given the cache an earlier call returned) gets only the mask and position changes,
since the cache already holds the virtual tokens. With ``use_cache=False`` a given cache is
ignored and every call starts afresh (``generate(use_cache=False)`` hands back the cache the
previous call filled). ``generate`` therefore works through the
same forward: its decode steps pay attention over ``N`` cached tokens and nothing else.
``prepare_inputs_for_generation`` is wrapped only to drop the position ids ``generate``
makes for prompt tuning (PEFT ignores position ids there), without the forward's warning.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch
import torch.nn as nn

from fastpeft.methods.modules_to_save import find_modules_to_save
from fastpeft.methods.prompt.config import (
    SUPPORTED_TASK_TYPES,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    is_reparameterized,
)
from fastpeft.methods.prompt.prefix_encoder import PrefixEncoder
from fastpeft.methods.prompt.prompt_embedding import PromptEmbedding, PTuningEncoder
from fastpeft.methods.state import AdapterState, adapter_state, check_not_adapted, clear_adapter, record_adapter
from fastpeft.methods.state import require_module

# Submodule that holds the virtual-token parameters.
ENCODER_NAME = "fastpeft_prompt_encoder"
# Model types whose attention PEFT post-processes or gives a special cache for prefix tuning.
_PREFIX_UNSUPPORTED_MODEL_TYPES = ("bloom", "gpt_bigcode", "chatglm", "gemma2", "gemma3_text", "gemma4")
# Key of the model inputs prepare_inputs_for_generation has already adjusted (popped by the forward).
_GENERATE_KEY = "_fastpeft_prompt_generate"


def prompt_state(model: nn.Module) -> AdapterState | None:
    """The model's adapter state when it carries a fastpeft prompt / prefix adapter, else None."""
    state = adapter_state(model)
    return state if state is not None and isinstance(state.config, PromptLearningConfig) else None


def prompt_encoder(model: nn.Module) -> PromptEmbedding | PrefixEncoder:
    """The model's ``PromptEmbedding`` (``PTuningEncoder``) / ``PrefixEncoder``; a
    ``ValueError`` when it has none."""
    encoder = getattr(model, ENCODER_NAME, None)
    if prompt_state(model) is None or not isinstance(encoder, (PromptEmbedding, PrefixEncoder)):
        raise ValueError("model has no fastpeft prompt-tuning, prefix-tuning or P-tuning adapter")
    return encoder


def _batch_size(args: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if args.get(key) is not None:
            return args[key].shape[0]
    raise ValueError("prompt / prefix tuning forward needs input_ids or inputs_embeds")


class PromptForward:
    """The ``forward`` of one model carrying a prompt / prefix adapter (kept in the instance
    ``__dict__``; it holds the model and the forward it replaced, so ``copy.deepcopy`` carries
    it over bound to the copy). See the module docstring for what it changes."""

    def __init__(self, model: nn.Module, original: Any) -> None:
        self.model = model
        self.original = original
        # generate() and Trainer inspect the forward's signature: show the model's own
        self.__signature__ = inspect.signature(original)
        params = self.__signature__.parameters
        self.positional = [n for n, p in params.items()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # transformers 5 calls it "cache" (also a model that passes **kwargs on to its backbone)
        self.cache_key = "past_key_values" if "past_key_values" in params else "cache"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.positional):
            raise TypeError(f"forward takes at most {len(self.positional)} positional arguments, got {len(args)}")
        for name, value in zip(self.positional, args):
            if name in kwargs:
                raise TypeError(f"forward got multiple values for argument {name!r}")
            kwargs[name] = value
        from_generate = kwargs.pop(_GENERATE_KEY, False)
        state = prompt_state(self.model)
        if state is None:  # adapter removed
            return self.original(**kwargs)
        return self.original(**self.adjust(state.config, kwargs, from_generate=from_generate))

    def adjust(
        self, config: PromptLearningConfig, kw: dict[str, Any], *, from_generate: bool = False
    ) -> dict[str, Any]:
        """The model's forward arguments with the virtual tokens added (module docstring)."""
        batch = _batch_size(kw)
        cache = self._given_cache(kw)
        continuing = cache is not None and cache.get_seq_length() > 0
        prefix = isinstance(config, PrefixTuningConfig)
        _extend_mask_and_ids(config, kw, batch, prefix=prefix, continuing=continuing, from_generate=from_generate)
        if not continuing:
            if prefix:
                cache = self._prefix_cache(config, batch, cache)
            else:
                self._prepend_prompts(config, kw, batch)
        if cache is not None:
            kw[self.cache_key] = cache
        return kw

    def _given_cache(self, kw: dict[str, Any]) -> Any:
        """The key/value cache of the call (under either name), taken out of ``kw``; None
        with ``use_cache=False`` (``generate(use_cache=False)`` hands back the cache the last
        call filled: every call gets the whole sequence and starts afresh)."""
        from transformers import Cache

        cache = kw.pop("past_key_values", None)
        cache = kw.pop("cache", cache)
        if kw.get("use_cache") is False:
            return None
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"prompt / prefix tuning takes the key/value cache as a transformers Cache, got "
                            f"{type(cache).__name__}")
        return cache

    def _prefix_cache(self, config: PrefixTuningConfig, batch: int, cache: Any) -> Any:
        """``cache`` (an empty one, filled in place) or a new ``DynamicCache`` holding the prefix
        keys and values of every layer, in the model's dtype."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        key_values = prompt_encoder(self.model).key_values(batch, config.num_attention_heads, self.model.dtype)
        for layer, (key, value) in enumerate(key_values):
            cache.update(key, value, layer)
        return cache

    def _prepend_prompts(self, config: PromptLearningConfig, kw: dict[str, Any], batch: int) -> None:
        """``inputs_embeds = cat(prompts, embeds)`` (ids embedded first), causal LM labels
        padded with ``-100`` for the virtual tokens."""
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = self.model.get_input_embeddings()(kw["input_ids"])
        kw["inputs_embeds"] = torch.cat((prompt_encoder(self.model)(batch, embeds.dtype), embeds), dim=1)
        kw["input_ids"] = None
        labels = kw.get("labels")
        if labels is not None and config.task_type == "CAUSAL_LM":
            kw["labels"] = torch.cat((labels.new_full((batch, config.num_virtual_tokens), -100), labels), dim=1)


def _extend_mask_and_ids(
    config: PromptLearningConfig, kw: dict[str, Any], batch: int, *, prefix: bool, continuing: bool,
    from_generate: bool,
) -> None:
    """PEFT's changes to the other inputs: the mask gets ``N`` leading ones; position ids are
    shifted by ``N`` (prefix) or dropped (prompts; with PEFT's warning unless they are
    ``generate``'s); token type ids get ``N`` leading zeros (SEQ_CLS prompts), or are dropped
    with PEFT's warning (other tasks)."""
    n = config.num_virtual_tokens
    mask = kw.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
            raise ValueError(f"prompt / prefix tuning needs a 2-D attention_mask [batch, length], got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        kw["attention_mask"] = torch.cat((mask.new_ones(batch, n), mask), dim=1)
    if kw.get("position_ids") is not None:
        if prefix:
            kw["position_ids"] = kw["position_ids"] + n
        else:
            if not from_generate:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position "
                              "ids.", stacklevel=5)
            kw["position_ids"] = None
    token_types = kw.get("token_type_ids")
    if token_types is not None:
        if config.task_type != "SEQ_CLS":
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token "
                          "type ids", stacklevel=5)
            kw["token_type_ids"] = None
        elif not prefix and not continuing:
            kw["token_type_ids"] = torch.cat((token_types.new_zeros(batch, n), token_types), dim=1)


class PromptGenerationInputs:
    """``prepare_inputs_for_generation`` of a model carrying a prompt / prefix adapter: the
    model's own, with its inputs marked for the forward (which then drops ``generate``'s
    position ids for prompt tuning without warning, as PEFT ignores them)."""

    def __init__(self, model: nn.Module, original: Any) -> None:
        self.model = model
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = self.original(*args, **kwargs)
        if prompt_state(self.model) is not None:
            inputs[_GENERATE_KEY] = True
        return inputs


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"prompt / prefix tuning needs a transformers model with an nn.Embedding input embedding "
                         f"(get_input_embeddings()), got {type(model).__name__}")
    return embeddings


def _model_layers(model_config: object) -> tuple[int | None, int | None, int | None]:
    """(layers, key/value heads, head_dim) of a transformers config, None where unknown."""
    get = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(get, "num_hidden_layers", None)
    heads = getattr(get, "num_attention_heads", None)
    kv_heads = getattr(get, "num_key_value_heads", None) or heads
    hidden = getattr(get, "hidden_size", None)
    head_dim = getattr(get, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return layers, kv_heads, head_dim


def _check_model(model: nn.Module, config: PromptLearningConfig) -> None:
    """Refuse what the forward cannot reproduce, before anything changes."""
    name = type(config).__name__
    if config.task_type not in SUPPORTED_TASK_TYPES:
        raise ValueError(f"{name}.task_type must be one of {SUPPORTED_TASK_TYPES} (PEFT's forward for that task is "
                         f"what fastpeft reproduces), got {config.task_type!r}")
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError("prompt / prefix tuning of encoder-decoder models is not supported")
    word = _word_embeddings(model)
    if not isinstance(config, PrefixTuningConfig):
        if config.token_dim != word.embedding_dim:
            raise ValueError(f"{name}.token_dim={config.token_dim} differs from the model's embedding "
                             f"size {word.embedding_dim}")
        return
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"PrefixTuningConfig.token_dim={config.token_dim} is not a multiple of "
                         f"num_attention_heads={config.num_attention_heads}")
    if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        # the recomputed layers would append to the key/value cache a second time (PEFT refuses too)
        raise ValueError("prefix tuning does not work with gradient checkpointing; disable it "
                         "(model.gradient_checkpointing_disable()) first")
    model_type = getattr(model_config, "model_type", "")
    if model_type in _PREFIX_UNSUPPORTED_MODEL_TYPES:
        raise ValueError(f"prefix tuning on model type {model_type!r} is not supported (PEFT gives it a special "
                         "cache layout)")
    if "cache" not in inspect.signature(model.forward).parameters and "past_key_values" not in \
            inspect.signature(model.forward).parameters and not _passes_kwargs(model):
        raise ValueError(f"{type(model).__name__}.forward takes no key/value cache, which prefix tuning needs")
    layers, kv_heads, head_dim = _model_layers(model_config)
    want = (config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads)
    if layers is not None and kv_heads is not None and head_dim is not None and want != (layers, kv_heads, head_dim):
        raise ValueError(f"PrefixTuningConfig gives (num_layers, heads, head_dim) = {want}, but the model's attention "
                         f"has {(layers, kv_heads, head_dim)} (key/value heads)")


def _passes_kwargs(model: nn.Module) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def build_encoder(
    model: nn.Module, config: PromptLearningConfig, *, initialize: bool, stored: bool = False
) -> PromptEmbedding | PrefixEncoder:
    """The virtual-token module for a resolved ``config`` on the device of the model's input
    embedding, float32; with ``initialize``, PEFT's init (``prompt_tuning_init``). ``stored``:
    the module that holds PEFT's saved tensor as its one parameter (no reparameterization)."""
    word = _word_embeddings(model)
    device = word.weight.device
    folded = stored and is_reparameterized(config)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers,
                             prefix_projection=config.prefix_projection and not folded,
                             encoder_hidden_size=config.encoder_hidden_size,
                             init_weights=config.init_weights if initialize else None, device=device)
    if isinstance(config, PromptEncoderConfig) and not folded:
        return PTuningEncoder(config.num_virtual_tokens, config.token_dim,
                              reparameterization=config.encoder_reparameterization_type,
                              hidden_size=config.encoder_hidden_size, num_layers=config.encoder_num_layers,
                              dropout=config.encoder_dropout, device=device)
    encoder = PromptEmbedding(config.num_virtual_tokens, config.token_dim, device=device)
    if not isinstance(config, PromptTuningConfig):
        return encoder
    if initialize and config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word.num_embeddings, (config.num_virtual_tokens,), dtype=torch.long)
        encoder.init_from_tokens(word, ids)
    elif initialize and config.prompt_tuning_init == "TEXT":
        encoder.init_from_tokens(word, _text_token_ids(config))
    return encoder


def _text_token_ids(config: PromptTuningConfig) -> list[int]:
    tokenizer = config.tokenizer_name_or_path
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: no remote code from an adapter config
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return list(ids)


def resolve_config(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """``config`` with the model-shape fields filled from the model, checked against it."""
    resolved = config.resolve(getattr(model, "config", None))
    _check_model(model, resolved)
    return resolved


def plan_modules_to_save(model: nn.Module, config: PromptLearningConfig) -> tuple[str, ...]:
    """Paths of the modules trained in full (PEFT's suffix rule; SEQ_CLS adds its head)."""
    return find_modules_to_save(model, config.saved_modules_to_save, f"{type(config).__name__}.modules_to_save")


def install_prompt(
    model: nn.Module,
    config: PromptLearningConfig,
    encoder: PromptEmbedding | PrefixEncoder,
    modules_to_save: dict[str, nn.Module],
    *,
    trainable: bool,
) -> None:
    """Attach ``encoder`` and the ``modules_to_save`` copies, freeze every other parameter (all
    of them unless ``trainable``), replace the model's forward and record the adapter.
    Nothing here fails on checked inputs."""
    for path, module in modules_to_save.items():
        model.set_submodule(path, module)
    model.requires_grad_(False)
    model.add_module(ENCODER_NAME, encoder)
    encoder.requires_grad_(trainable)
    for module in modules_to_save.values():
        module.requires_grad_(trainable)
    object.__setattr__(model, "forward", PromptForward(model, model.forward))
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        object.__setattr__(model, "prepare_inputs_for_generation",
                           PromptGenerationInputs(model, model.prepare_inputs_for_generation))
    record_adapter(model, AdapterState(config, tuple(modules_to_save)))


def inject_prompt(model: nn.Module, config: PromptLearningConfig) -> nn.Module:
    """Add a prompt-tuning or prefix-tuning adapter to ``model`` in place (``fastpeft.inject``
    with a ``PromptTuningConfig`` / ``PrefixTuningConfig``), as PEFT's ``get_peft_model``
    would, and return it. Every other parameter is frozen; ``modules_to_save`` (and a SEQ_CLS
    model's ``classifier`` / ``score``) become trainable copies.

    Raises:
        ValueError: an unsupported task type, model or configuration (the message says which:
            encoder-decoder models, prefix tuning under gradient checkpointing or with shapes
            that differ from the model's attention, ...), or a model that already has an
            adapter. The model is then unchanged.
    """
    require_module(model)
    check_not_adapted(model)
    if hasattr(model, ENCODER_NAME):
        raise ValueError(f"model already has a {ENCODER_NAME} submodule")
    resolved = resolve_config(model, config)
    paths = plan_modules_to_save(model, resolved)
    encoder = build_encoder(model, resolved, initialize=True)
    copies = {path: copy.deepcopy(model.get_submodule(path)) for path in paths}
    install_prompt(model, resolved, encoder, copies, trainable=True)
    return model


def merge_prefix(model: nn.Module) -> nn.Module:
    """Fold a prefix-tuning adapter's reparameterization MLP (``prefix_projection``), or a
    P-tuning adapter's MLP / LSTM, into stored prefixes / prompts, so that the forward and
    ``generate`` read them with no MLP; return ``model``. Outputs are unchanged (to float32
    rounding of the one evaluation). The stored tensor keeps the adapter's
    ``requires_grad``; saving writes the same ``prompt_embeddings`` as before. A no-op when
    there is nothing to fold (prefix tuning without ``prefix_projection``, already merged).

    Raises:
        ValueError: the model has no fastpeft prefix-tuning or P-tuning adapter.
    """
    encoder = prompt_encoder(require_module(model))
    if not isinstance(encoder, (PrefixEncoder, PTuningEncoder)):
        raise ValueError("merge_prefix: the model's adapter is prompt tuning, which has no MLP to fold")
    encoder.merge()
    return model


def unload_prompt(model: nn.Module) -> nn.Module:
    """Remove a prompt / prefix / P-tuning adapter (``fastpeft.unload``): the encoder
    submodule, the instance ``forward`` / ``prepare_inputs_for_generation`` and the adapter
    record go, so the model computes the base model's output again; ``modules_to_save``
    copies stay and ``save_pretrained`` writes the whole model again. Returns ``model``."""
    prompt_encoder(model)  # raises when there is no prompt adapter
    delattr(model, ENCODER_NAME)
    for name, kind in (("forward", PromptForward), ("prepare_inputs_for_generation", PromptGenerationInputs)):
        if isinstance(model.__dict__.get(name), kind):
            original = model.__dict__[name].original
            if getattr(original, "__self__", None) is model and original.__func__ is getattr(type(model), name, None):
                del model.__dict__[name]  # the class's own method again
            else:
                object.__setattr__(model, name, original)
    clear_adapter(model)
    return model
