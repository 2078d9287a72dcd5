"""``LoraConfig``: HF PEFT's LoRA configuration, with PEFT's field names and meanings, read
from and written to PEFT's ``adapter_config.json``.

Keys of a PEFT config fall in four groups (see ``from_dict``):

* fields of ``LoraConfig`` (below);
* metadata and creation-time settings that do not change the adapter's math once its
  weights exist (``peft_version``, ``revision``, ``inference_mode``, ``loftq_config``,
  ``eva_config``, ...): accepted and ignored;
* features fastpeft does not implement that change the math or the model (``lora_bias``, ``layer_replication``, ``target_parameters``, trainable tokens, aLoRA,
  QALoRA, the LoRA variants, Megatron, weight tying): a ``ValueError`` names the key when
  it is set, and they are accepted when unset (None / False / empty);
* unknown keys (newer PEFT versions): ignored, with a warning when their value is set.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:  # the regex parser behind re.compile (sre_parse before Python 3.11, deprecated since)
    from re import _parser as _regex_parser
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser

from fastpeft.methods.state import TASK_TYPES

PEFT_TYPE = "LORA"
ALL_LINEAR = "all-linear"
# init_lora_weights values ``inject`` can create (PEFT's others need data or rewrite the base
# weights: they are accepted when loading trained weights, where the init no longer matters).
CREATABLE_INITS = (True, False, "gaussian")
# init_lora_weights values that activate PEFT's MiCA variant: plain LoRA forward, lora_B frozen.
FROZEN_B_INITS = ("mica",)

_IGNORED_KEYS = frozenset({
    "peft_type", "peft_version", "revision", "auto_mapping", "inference_mode", "runtime_config",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
_UNSUPPORTED_KEYS = {
    "lora_bias": "a bias on lora_B is not implemented",
    "layer_replication": "layer replication changes the model's layers",
    "target_parameters": "LoRA on bare nn.Parameters is not implemented",
    "trainable_token_indices": "trainable tokens are not implemented",
    "alora_invocation_tokens": "activated LoRA (aLoRA) changes the forward",
    "use_qalora": "QALoRA (pooled LoRA input) is not implemented",
    "velora_config": "the VeLoRA variant is not implemented",
    "kasa_config": "the KaSA variant is not implemented",
    "use_bdlora": "block-diagonal LoRA is not implemented",
    "arrow_config": "Arrow routing is not implemented",
    "monteclora_config": "the MonteCLoRA variant is not implemented",
    "megatron_config": "Megatron parallel layers are not supported",
    "ensure_weight_tying": "tying adapters across tied layers is not implemented",
}


def _plain(value: Any) -> Any:
    """An enum member (PEFT's PeftType / TaskType are str enums) as its value."""
    return value.value if isinstance(value, enum.Enum) else value


def _require_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LoraConfig.{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"LoraConfig.{name} must be >= {minimum}, got {value}")
    return value


def _require_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LoraConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"LoraConfig.{name} must be finite, got {value}")
    return value


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"LoraConfig.{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def rank_pattern_regex(key: str) -> str:
    """The regex a ``rank_pattern`` / ``alpha_pattern`` key is matched with (PEFT's, ``re.match``)."""
    return rf"(.*\.)?({key})$"


def modules_to_save_regex(name: str) -> str:
    """The regex (PEFT's, ``re.match``) of the paths of a ``modules_to_save`` module and of
    the modules inside it, which LoRA never targets."""
    return rf"(^|.*\.){name}($|\..*)"


def layers_pattern_regex(pattern: str) -> str:
    """The regex (PEFT's, ``re.match``) whose group ``idx`` is the layer index after a
    ``layers_pattern`` path segment."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


# Possessive repeats ('a*+') and atomic groups ('(?>...)') exist from Python 3.11 on.
_REPEATS = {_regex_parser.MAX_REPEAT, _regex_parser.MIN_REPEAT, getattr(_regex_parser, "POSSESSIVE_REPEAT", None)}
_ATOMIC_GROUP = getattr(_regex_parser, "ATOMIC_GROUP", None)
_ASSERTIONS = {_regex_parser.ASSERT, _regex_parser.ASSERT_NOT}


def _backtracking_hazard(items: Any, in_repeat: bool) -> str | None:
    """What makes the parsed regex ``items`` (``re._parser.parse``'s tree) backtrack
    exponentially, or None: inside a repeat that can run more than once (``in_repeat``), a
    repeat of variable count (``(a+)+``, ``(.*a){25}``, ``(a?){25}``) or an alternation
    (``(a|a)*``) lets the regex split one text in exponentially many ways, all of which ``re``
    tries before it gives up on a text that does not match. Conservative: some such regexes
    split a text in one way only (``(\\w+\\.)*``: the dot ends each run) and are refused too.
    Repeats side by side (``.*a.*b``) cost a power of the text's length, not an exponential,
    and pass. Lookarounds are walked as regexes of their own: ``re`` never backtracks into one,
    so inside a repeat it costs one match per try instead of multiplying the ways to split."""
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if in_repeat and low != high:
                return "a repeat ('*', '+', '?', '{m,n}') inside another repeat"
            parts, inside = [body], in_repeat or high > 1
        elif op is _regex_parser.BRANCH:
            if in_repeat:
                return "an alternation ('|') inside a repeat"
            parts, inside = av[1], False
        elif op is _regex_parser.SUBPATTERN:
            parts, inside = [av[-1]], in_repeat
        elif op is _ATOMIC_GROUP:
            parts, inside = [av], in_repeat
        elif op is _regex_parser.GROUPREF_EXISTS:  # (?(group)yes|no): the group decides, no alternation
            parts, inside = [arm for arm in av[1:] if arm is not None], in_repeat
        elif op in _ASSERTIONS:
            parts, inside = [av[1]], False
        else:
            continue
        for part in parts:
            hazard = _backtracking_hazard(part, inside)
            if hazard:
                return hazard
    return None


def _require_regex(name: str, pattern: str) -> str:
    """``pattern``, the regex matched for field ``name``, compiles and cannot backtrack
    exponentially (``_backtracking_hazard``): ``re`` has no timeout, so such a regex would
    hang matching a long module path, as it hangs PEFT. ValueError naming the field if not."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"LoraConfig.{name}: {pattern!r} is not a valid regular expression ({exc})") from None
    hazard = _backtracking_hazard(_regex_parser.parse(pattern), in_repeat=False)
    if hazard:
        raise ValueError(
            f"LoraConfig.{name}: the regular expression {pattern!r} has {hazard}, so matching it against a module "
            "path can backtrack exponentially (catastrophic backtracking; Python's re cannot time out a match) and "
            "never finish. Rewrite it without the nesting (e.g. '[\\w.]*' for '(\\w+\\.)*', '.*' for '(.*)*') "
            "or list the module names instead")
    return pattern


def _str_tuple(name: str, value: object) -> tuple[str, ...]:
    """A list / tuple / set of strings as a tuple (a set sorted, for a stable order)."""
    if isinstance(value, str) or not isinstance(value, (Sequence, set, frozenset)):
        raise TypeError(f"LoraConfig.{name} must be a list of str, got {type(value).__name__} {value!r}")
    items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise TypeError(f"LoraConfig.{name} must contain only str, got {bad!r}")
    return tuple(dict.fromkeys(items))


def _names(name: str, value: object) -> str | tuple[str, ...] | None:
    """None, a regex string (fully matched against module paths), or a list of names."""
    if value is None:
        return None
    if isinstance(value, str):
        return _require_regex(name, value)
    return _str_tuple(name, value)


def _pattern_dict(name: str, value: object, check) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern``: regex key -> value, keys used as ``(.*\\.)?(key)$``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"LoraConfig.{name} must be a dict of pattern -> value, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"LoraConfig.{name} keys must be str, got {key!r}")
        _require_regex(f"{name}[{key!r}]", rank_pattern_regex(key))
        out[key] = check(f"{name}[{key!r}]", item)
    return out


@dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoRA configuration (same field names and meanings as ``peft.LoraConfig``).

    Attributes:
        r: default rank (>= 1).
        lora_alpha: default alpha; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch input, in [0, 1).
        target_modules: which modules get LoRA. A list of names: a module path matches when it
            equals a name or ends with ``"." + name``. A string: a regex ``re.fullmatch``-ed
            against the module path; ``"all-linear"`` (any case) instead means every
            ``nn.Linear`` / ``Conv1D`` except the output embedding of a transformers model (or
            its ``score`` / ``classifier`` head with ``task_type="SEQ_CLS"`` when it has no
            output embedding). None is rejected by ``inject`` (PEFT's per-architecture
            defaults are not mirrored).
        exclude_modules: modules never targeted: a list (exact path or ``"." + name`` suffix)
            or a regex string (``re.fullmatch``).
        bias: only ``"none"`` (PEFT's ``"all"`` / ``"lora_only"`` train base biases).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        use_dora: DoRA (weight-decomposed LoRA, ``fastpeft.methods.lora.dora_layer``): each
            layer also trains a magnitude per output feature (``lora_magnitude_vector``).
        fan_in_fan_out: whether target weights are stored ``[in, out]``. As in PEFT it is
            decided per module by its type (True for transformers ``Conv1D``, False for
            ``nn.Linear``), with a warning when this field says otherwise.
        rank_pattern, alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``; a key
            applies to a module path matching ``(.*\\.)?(key)$``, the first such key in dict
            order wins.
        layers_to_transform: with a list ``target_modules``, only modules in these layer
            indices (an int or a list). The index is the first ``.<digits>.`` path segment,
            or the one right after a ``layers_pattern`` segment.
        layers_pattern: name(s) of the layer list (``"layers"``, ``"h"``); needs
            ``layers_to_transform``.
        modules_to_save: extra modules trained in full and saved with the adapter. A module
            path matches when it ends with one of these strings (PEFT's rule). ``inject``
            replaces each such module by a trainable deep copy (as PEFT's wrapper, which
            forwards through its copy); LoRA never targets a module inside one.
        init_lora_weights: ``True`` (A kaiming-uniform, B zeros), ``False`` (both random) or
            ``"gaussian"``; PEFT's other values are accepted for loading trained adapters.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or None; saved, and
            used only by ``"all-linear"`` as described.
        base_model_name_or_path: saved in ``adapter_config.json``.

    The config is immutable; use ``dataclasses.replace`` to change a field. Lists are stored
    as tuples, with duplicates dropped.

    Regular expressions (a ``target_modules`` / ``exclude_modules`` string, the keys of
    ``rank_pattern`` / ``alpha_pattern``, ``layers_pattern`` and ``modules_to_save`` entries,
    which PEFT's matching puts into regexes) are checked here, before any model is touched: a
    ``ValueError`` names the field when one does not compile, or when it nests a variable
    repeat or an alternation inside a repeat (``(a+)+``, ``(.*a){25}``, ``(a|a)*``), which can
    backtrack exponentially: ``re`` cannot time out a match, and such a regex would hang
    matching a long module path (it hangs PEFT). Repeats side by side, as in
    ``.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$``, pass.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        _require_int("r", self.r, 1)
        _require_number("lora_alpha", self.lora_alpha)
        dropout = _require_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {dropout}")
        put("target_modules", _names("target_modules", self.target_modules))
        put("exclude_modules", _names("exclude_modules", self.exclude_modules))
        if self.bias != "none":
            if self.bias in ("all", "lora_only"):
                raise ValueError(f"LoraConfig.bias={self.bias!r} trains the base layers' biases, which fastpeft "
                                 "does not implement; only 'none' is supported")
            raise ValueError(f"LoraConfig.bias must be 'none' (PEFT also knows 'all', 'lora_only'), got {self.bias!r}")
        _require_bool("use_rslora", self.use_rslora)
        _require_bool("use_dora", self.use_dora)
        _require_bool("fan_in_fan_out", self.fan_in_fan_out)
        put("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, lambda n, v: _require_int(n, v, 1)))
        put("alpha_pattern", _pattern_dict("alpha_pattern", self.alpha_pattern, _require_number))
        self._check_layers(put)
        if self.modules_to_save is not None:
            put("modules_to_save", _str_tuple("modules_to_save", self.modules_to_save))
            for i, name in enumerate(self.modules_to_save):
                _require_regex(f"modules_to_save[{i}]", modules_to_save_regex(name))
        init = self.init_lora_weights
        if not isinstance(init, (bool, str)):
            raise TypeError(f"LoraConfig.init_lora_weights must be a bool or str, got {type(init).__name__} {init!r}")
        task_type = _plain(self.task_type)
        if task_type is not None and task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
        put("task_type", task_type)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"LoraConfig.base_model_name_or_path must be a str or None, "
                            f"got {type(self.base_model_name_or_path).__name__}")

    def _check_layers(self, put) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                _require_int("layers_to_transform", layers, 0)
            else:
                if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
                    raise TypeError(f"LoraConfig.layers_to_transform must be an int or a list of int, got {layers!r}")
                layers = tuple(_require_int("layers_to_transform", i, 0) for i in layers)
            put("layers_to_transform", layers)
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig.layers_to_transform cannot be used when target_modules is a str "
                                 "(a regex or 'all-linear'); PEFT applies it to a list of names only")
        if self.layers_pattern is not None:
            pattern = self.layers_pattern
            if isinstance(pattern, str):
                _require_regex("layers_pattern", layers_pattern_regex(pattern))
            else:
                put("layers_pattern", _str_tuple("layers_pattern", pattern))
                for i, item in enumerate(self.layers_pattern):
                    _require_regex(f"layers_pattern[{i}]", layers_pattern_regex(item))
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig.layers_pattern cannot be used when target_modules is a str")
            if self.layers_pattern and layers is None:
                raise ValueError("LoraConfig.layers_pattern needs layers_to_transform")

    @property
    def is_all_linear(self) -> bool:
        """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand."""
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def to_dict(self) -> dict[str, Any]:
        """The fields as PEFT's ``adapter_config.json`` holds them (tuples as lists) plus
        ``peft_type: "LORA"``; JSON-serialisable."""
        out: dict[str, Any] = {"peft_type": PEFT_TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @property
    def trains_lora_b(self) -> bool:
        """Whether ``lora_B`` trains: PEFT's MiCA init (``init_lora_weights="mica"``) keeps it
        frozen and trains only ``lora_A`` (its forward is plain LoRA)."""
        return self.init_lora_weights not in FROZEN_B_INITS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Build from a PEFT ``adapter_config.json`` dict (or ``peft.LoraConfig.to_dict()``).

        ``peft_type`` must be ``"LORA"`` when present. Keys are handled as the module
        docstring describes: a ``ValueError`` names any set feature fastpeft does not
        implement; unknown keys are ignored (with a warning when set).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"config data must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = _without_peft_only_keys(data, "adapter config")
        unknown = sorted(key for key, value in kwargs.items() if key not in names and value)
        if unknown:
            warnings.warn(f"LoraConfig.from_dict: ignoring unknown adapter config keys {unknown} "
                          "(probably from a newer PEFT version)", stacklevel=2)
        return cls(**{key: value for key, value in kwargs.items() if key in names})


def _without_peft_only_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` less PEFT's keys that are not ``LoraConfig`` fields: metadata (dropped), and
    unimplemented features (dropped when unset, a ``ValueError`` naming the key when set).
    ``peft_type``, when present, must be ``"LORA"``."""
    peft_type = _plain(data.get("peft_type", PEFT_TYPE))
    if peft_type != PEFT_TYPE:
        raise ValueError(f"peft_type must be {PEFT_TYPE!r}: fastpeft reads LoRA adapters only, got {peft_type!r}")
    out = {}
    for key, value in data.items():
        if key in _UNSUPPORTED_KEYS:
            if value:
                raise ValueError(f"{source} sets {key}={value!r}: {_UNSUPPORTED_KEYS[key]} in fastpeft")
        elif key not in _IGNORED_KEYS:
            out[key] = value
    return out


_dataclass_init = LoraConfig.__init__


@functools.wraps(_dataclass_init, assigned=("__module__", "__name__", "__qualname__"))
def _init_accepting_peft_keys(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
    """``LoraConfig(**kwargs)`` also takes the PEFT-only keys ``from_dict`` knows, so code
    written for ``peft.LoraConfig`` runs: metadata such as ``inference_mode=False`` is
    ignored, and a set unimplemented feature (``lora_bias=True``) is a ``ValueError`` naming
    it. Any other unknown keyword stays a ``TypeError``."""
    _dataclass_init(self, *args, **_without_peft_only_keys(kwargs, "LoraConfig"))


LoraConfig.__init__ = _init_accepting_peft_keys
