"""``PromptTuningConfig`` / ``PrefixTuningConfig``: HF PEFT's prompt-learning configurations,
with PEFT's field names and meanings, read from and written to PEFT's ``adapter_config.json``.

Prompt tuning prepends ``num_virtual_tokens`` trainable embeddings to the input embeddings;
prefix tuning prepends ``num_virtual_tokens`` trainable key/value vectors to every attention
layer (through the model's key/value cache), optionally produced by PEFT's
``Embedding -> Linear -> Tanh -> Linear`` reparameterization (``prefix_projection``).

The model-shape fields (``num_layers``, ``token_dim``, ``num_attention_heads``,
``encoder_hidden_size``) may be left None: ``resolve`` fills them from the model's config
as PEFT's ``_prepare_prompt_learning_config`` does (for prefix tuning on a grouped-query
model, ``token_dim`` / ``num_attention_heads`` become the key/value projection's size).
PEFT's ``P_TUNING`` (a prompt encoder MLP / LSTM) and the other prompt-learning types are
refused with a ``ValueError`` naming them. ``PromptEncoderConfig`` is PEFT's P-tuning: prompt
tuning whose prompts come out of a trainable MLP or LSTM (``P_TUNING``).
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fastpeft.methods.state import TASK_TYPES

PROMPT_TUNING = "PROMPT_TUNING"
PREFIX_TUNING = "PREFIX_TUNING"
P_TUNING = "P_TUNING"
PROMPT_PEFT_TYPES = (PROMPT_TUNING, PREFIX_TUNING, P_TUNING)
# PEFT's other prompt-learning types: a clear refusal instead of "unknown peft_type".
_REFUSED_PEFT_TYPES = {
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning is not implemented",
    "CPT": "context-aware prompt tuning (CPT) is not implemented",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter) is not implemented",
    "CARTRIDGE": "cartridges are not implemented",
}
# Task types whose PEFT forward fastpeft reproduces: decoder-only language models, sequence
# classification (encoders such as BERT, or decoders with a score head) and bare encoders.
SUPPORTED_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
# PEFT's PeftModelForSequenceClassification adds these to modules_to_save (the new head trains).
SEQ_CLS_HEADS = ("classifier", "score")
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
# Keys of PEFT's configs that are metadata or creation-time settings: accepted, ignored.
_IGNORED_KEYS = frozenset({"peft_type", "peft_version", "revision", "auto_mapping", "inference_mode"})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def peft_type_of(data: Mapping[str, Any]) -> str | None:
    """The ``peft_type`` of a config dict, as a plain string (None when absent)."""
    return _plain(data.get("peft_type"))


def is_prompt_peft_type(peft_type: object) -> bool:
    """Whether a ``peft_type`` names a prompt-learning method (supported or refused)."""
    return _plain(peft_type) in PROMPT_PEFT_TYPES or _plain(peft_type) in _REFUSED_PEFT_TYPES


def _set_choice(config: Any, cls: str, name: str, allowed: Sequence[str], allow_none: bool = False) -> Any:
    """Field ``name`` of the frozen ``config`` as a plain string (enum members unwrapped),
    which must be in ``allowed`` (or None with ``allow_none``); stores and returns it."""
    value = _plain(getattr(config, name))
    if not (value in allowed or (allow_none and value is None)):
        either = "None or one of" if allow_none else "one of"
        raise ValueError(f"{cls}.{name} must be {either} {allowed}, got {value!r}")
    object.__setattr__(config, name, value)
    return value


def _optional_int(cls: str, name: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}.{name} must be an int >= {minimum} or None, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{cls}.{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class PromptLearningConfig:
    """Fields shared by ``PromptTuningConfig`` and ``PrefixTuningConfig`` (PEFT's
    ``PromptLearningConfig``).

    Attributes:
        num_virtual_tokens: number of virtual tokens (>= 1); required, as in PEFT.
        token_dim: hidden size of the model's embeddings (prefix tuning: of its key/value
            projections); None = from the model.
        num_transformer_submodules: 1 (decoder-only and encoder models); PEFT's 2 is for
            encoder-decoder models, which fastpeft does not support. None = 1.
        num_attention_heads: attention heads (prefix tuning: key/value heads); None = from the model.
        num_layers: transformer layers; None = from the model.
        modules_to_save: extra modules trained in full and saved with the adapter (PEFT's
            suffix rule); ``task_type="SEQ_CLS"`` adds PEFT's ``classifier`` / ``score``.
        task_type: ``"CAUSAL_LM"``, ``"SEQ_CLS"`` or ``"FEATURE_EXTRACTION"`` (PEFT's forward
            for that task is reproduced); required by ``inject``.
        base_model_name_or_path: saved in ``adapter_config.json``.
    """

    PEFT_TYPE: ClassVar[str] = ""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: Sequence[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise ValueError(f"{name}.num_virtual_tokens must be set (an int >= 1)")
        _optional_int(name, "num_virtual_tokens", self.num_virtual_tokens, 1)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            _optional_int(name, field_name, getattr(self, field_name), 1)
        submodules = _optional_int(name, "num_transformer_submodules", self.num_transformer_submodules, 1)
        if submodules not in (None, 1):
            raise ValueError(f"{name}.num_transformer_submodules={submodules}: only 1 (decoder-only and encoder "
                             "models) is supported; 2 is PEFT's setting for encoder-decoder models")
        _set_choice(self, name, "task_type", TASK_TYPES, allow_none=True)
        if self.modules_to_save is not None:
            items = self.modules_to_save
            if isinstance(items, str) or not isinstance(items, Sequence) or not all(isinstance(i, str) for i in items):
                raise TypeError(f"{name}.modules_to_save must be a list of str, got {items!r}")
            object.__setattr__(self, "modules_to_save", tuple(dict.fromkeys(items)))
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"{name}.base_model_name_or_path must be a str or None")

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    @property
    def saved_modules_to_save(self) -> tuple[str, ...]:
        """``modules_to_save`` as PEFT's task wrapper makes it (SEQ_CLS adds its heads)."""
        names = tuple(self.modules_to_save or ())
        if self.task_type == "SEQ_CLS":
            names += tuple(head for head in SEQ_CLS_HEADS if head not in names)
        return names

    def resolve(self, model_config: object) -> "PromptLearningConfig":
        """A copy with the model-shape fields PEFT fills from the model's config filled
        (``_prepare_prompt_learning_config``); raises a ``ValueError`` naming a field that
        neither the config nor the model gives."""
        data = _config_dict(model_config)
        num_layers = self.num_layers
        if num_layers is None:
            num_layers = getattr(model_config, "num_hidden_layers", None) or _first(data, "num_hidden_layers",
                                                                                      "num_layers", "n_layer")
        token_dim = self.token_dim if self.token_dim is not None else _first(data, "hidden_size", "n_embd", "d_model")
        heads = self.num_attention_heads
        if heads is None:
            heads = _first(data, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        for field_name, value in (("num_layers", num_layers), ("token_dim", token_dim), ("num_attention_heads", heads)):
            if value is None:
                raise ValueError(f"{type(self).__name__}.{field_name} is not set and the model's config does not "
                                 "give it; set it in the config")
        changes = {"num_layers": num_layers, "token_dim": token_dim, "num_attention_heads": heads,
                   "num_transformer_submodules": 1}
        changes.update(self._resolve_extra(data, token_dim, heads))
        return dataclasses.replace(self, **changes)

    def _resolve_extra(self, data: dict, token_dim: int, heads: int) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields (``peft_type`` included), JSON-serialisable."""
        out: dict[str, Any] = {"peft_type": self.PEFT_TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptLearningConfig":
        """Build from PEFT's ``adapter_config.json`` dict (or ``peft_config.to_dict()``); the
        ``peft_type`` must be this class's. PEFT metadata is ignored; unknown keys are ignored
        with a warning when set."""
        if not isinstance(data, Mapping):
            raise TypeError(f"config data must be a dict, got {type(data).__name__}")
        peft_type = peft_type_of(data)
        if peft_type not in (None, cls.PEFT_TYPE):
            raise ValueError(f"{cls.__name__} reads peft_type {cls.PEFT_TYPE!r}, got {peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k not in _IGNORED_KEYS}
        unknown = sorted(k for k, v in kwargs.items() if k not in names and v not in (None, False, {}, []))
        if unknown:
            warnings.warn(f"{cls.__name__}.from_dict: ignoring unknown adapter config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in kwargs.items() if k in names})


def _config_dict(model_config: object) -> dict:
    """The model config as a dict, its text config for a multimodal model (as PEFT)."""
    if model_config is None:
        return {}
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
    return data.get("text_config") or data


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    return None


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's prompt tuning (``peft.PromptTuningConfig``): ``num_virtual_tokens`` trainable
    embeddings prepended to the input embeddings.

    Attributes:
        prompt_tuning_init: ``"RANDOM"`` (``nn.Embedding``'s N(0, 1) init), ``"SAMPLE_VOCAB"``
            (rows of the model's word embeddings at random token ids) or ``"TEXT"`` (the word
            embeddings of ``prompt_tuning_init_text``'s tokens, repeated or cut to
            ``num_virtual_tokens``).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: for ``"TEXT"``: a tokenizer object (called as
            ``tokenizer(text)["input_ids"]``) or a name / local path for
            ``transformers.AutoTokenizer.from_pretrained``. A tokenizer object is saved as its
            ``name_or_path``.
        tokenizer_kwargs: keyword arguments for ``AutoTokenizer.from_pretrained``
            (``trust_remote_code`` is dropped, as PEFT does).
    """

    PEFT_TYPE: ClassVar[str] = PROMPT_TUNING

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = _set_choice(self, "PromptTuningConfig", "prompt_tuning_init", PROMPT_TUNING_INITS)
        if init == "TEXT":
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs prompt_tuning_init_text (a "
                                 f"non-empty str), got {self.prompt_tuning_init_text!r}")
            if not self.tokenizer_name_or_path:
                raise ValueError("PromptTuningConfig.prompt_tuning_init='TEXT' needs tokenizer_name_or_path "
                                 "(a tokenizer object, name or local path)")
        elif self.tokenizer_kwargs:
            raise ValueError("PromptTuningConfig.tokenizer_kwargs is only valid with prompt_tuning_init='TEXT'")
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str) and not callable(tok):
            raise TypeError(f"PromptTuningConfig.tokenizer_name_or_path must be a str or a tokenizer, "
                            f"got {type(tok).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, str):
            out["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None) or None
        if out["tokenizer_kwargs"] is not None:
            out["tokenizer_kwargs"] = dict(out["tokenizer_kwargs"])
        return out


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's prefix tuning (``peft.PrefixTuningConfig``): ``num_virtual_tokens`` trainable
    key / value vectors per attention layer, given to the model as its key/value cache.

    Attributes:
        prefix_projection: produce the prefix with PEFT's reparameterization
            ``Embedding(num_virtual_tokens, token_dim) -> Linear(token_dim, encoder_hidden_size)
            -> Tanh -> Linear(encoder_hidden_size, num_layers * 2 * token_dim)``; otherwise the
            prefix is one ``Embedding(num_virtual_tokens, num_layers * 2 * token_dim)``.
        encoder_hidden_size: the MLP's hidden size; None = ``token_dim``.
        init_weights: None (random, PEFT's default) or ``"zero"`` (the prefix starts at zero:
            the last linear, or the embedding, zeroed).
    """

    PEFT_TYPE: ClassVar[str] = PREFIX_TUNING

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _optional_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, 1)
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"PrefixTuningConfig.prefix_projection must be a bool, got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")

    def _resolve_extra(self, data: dict, token_dim: int, heads: int) -> dict[str, Any]:
        """PEFT's grouped-query rule: with ``num_key_value_heads`` in the model config the
        prefix holds that many heads of ``head_dim`` (the config's, else token_dim / heads)."""
        changes: dict[str, Any] = {}
        if data.get("num_key_value_heads") is not None:
            if any(data.get(k) is not None for k in ("global_head_dim", "per_layer_config")):
                raise ValueError("prefix tuning on models whose layers have different key/value shapes "
                                 "(global_head_dim / per_layer_config) is not supported")
            head_dim = data.get("head_dim") or token_dim // heads
            token_dim = head_dim * data["num_key_value_heads"]
            changes = {"token_dim": token_dim, "num_attention_heads": data["num_key_value_heads"]}
        if self.encoder_hidden_size is None:
            changes["encoder_hidden_size"] = token_dim
        return changes


REPARAMETERIZATIONS = ("MLP", "LSTM")


@dataclass(frozen=True)
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's P-tuning (``peft.PromptEncoderConfig``): prompt tuning whose virtual-token
    embeddings pass through a trainable reparameterization before they are prepended.

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (3 linears with ReLUs, hidden
            ``encoder_hidden_size``) or ``"LSTM"`` (a bidirectional LSTM over the virtual tokens,
            then 2 linears), as PEFT's ``PromptEncoder``.
        encoder_hidden_size: the reparameterization's hidden size; None = ``token_dim``.
        encoder_num_layers: LSTM layers (PEFT ignores it for the MLP, with a warning).
        encoder_dropout: dropout between LSTM layers, in [0, 1).
    """

    PEFT_TYPE: ClassVar[str] = P_TUNING

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = _set_choice(self, "PromptEncoderConfig", "encoder_reparameterization_type", REPARAMETERIZATIONS)
        _optional_int("PromptEncoderConfig", "encoder_hidden_size", self.encoder_hidden_size, 1)
        _optional_int("PromptEncoderConfig", "encoder_num_layers", self.encoder_num_layers, 1)
        dropout = self.encoder_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig.encoder_dropout must be a number in [0, 1), got {dropout!r}")
        if kind == "MLP" and self.encoder_num_layers != 2:
            warnings.warn("PromptEncoderConfig: for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP "
                          "layers are used.", stacklevel=3)

    def _resolve_extra(self, data: dict, token_dim: int, heads: int) -> dict[str, Any]:
        return {} if self.encoder_hidden_size is not None else {"encoder_hidden_size": token_dim}


PROMPT_CONFIG_TYPES = {PROMPT_TUNING: PromptTuningConfig, PREFIX_TUNING: PrefixTuningConfig,
                       P_TUNING: PromptEncoderConfig}


def is_reparameterized(config: PromptLearningConfig) -> bool:
    """Whether the adapter's trainable weights are not what PEFT saves: its file holds the
    computed prompts / prefix, not the MLP (LSTM) that makes them."""
    return isinstance(config, PromptEncoderConfig) or (isinstance(config, PrefixTuningConfig)
                                                        and config.prefix_projection)


def prompt_config_from_dict(data: Mapping[str, Any]) -> PromptLearningConfig:
    """The prompt-learning config a PEFT ``adapter_config.json`` dict describes; a
    ``ValueError`` names a prompt-learning type fastpeft does not implement."""
    peft_type = peft_type_of(data)
    if peft_type in _REFUSED_PEFT_TYPES:
        raise ValueError(f"peft_type {peft_type!r}: {_REFUSED_PEFT_TYPES[peft_type]} in fastpeft "
                         f"(supported prompt-learning types: {list(PROMPT_PEFT_TYPES)})")
    if peft_type not in PROMPT_CONFIG_TYPES:
        raise ValueError(f"peft_type must be one of {list(PROMPT_PEFT_TYPES)} for a prompt-learning config, "
                         f"got {peft_type!r}")
    return PROMPT_CONFIG_TYPES[peft_type].from_dict(data)
