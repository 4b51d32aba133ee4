"""Run configuration: nested dicts with defaults, dotted-key overrides and validation.

A run is described by one nested dict. Four sections are *named*: ``data``, ``model``, ``optim`` and
``schedule`` each hold a ``name`` and the options of that choice, which come from its registry (the
model's constructor signature, the optimizer's defaults, ...). Extensions (post-step hooks and extra
metrics such as ``enorm``) are sections that are off (``None``) until given a value.

Overrides use dotted keys: ``optim.lr=0.1``, ``model.norm_kwargs.num_groups=2``. Assigning a plain
value to a named section picks its name: ``model=vgg`` is ``model.name=vgg``; ``enorm=true`` turns an
extension on with its defaults, ``enorm=original`` with a named preset, and ``enorm.c=1.2`` turns it
on with ``c`` changed.

Every unknown key or invalid value raises :class:`~normlab.errors.ConfigError` listing the valid ones.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .registry import load_methods

TOP_LEVEL_DEFAULTS: dict[str, object] = {
    "name": None,  # run name; default derived from data, model, norm, optimizer and seed
    "out": "runs",  # parent folder of the run directory
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "deterministic": False,
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 1000,
    "resume": False,  # continue from runs/NAME/checkpoint.pt
    "overwrite": False,  # start over in an existing run directory
    "progress": True,  # tqdm bar over each epoch's batches
    "checkpoint": True,  # keep checkpoint.pt (model, optimizer, ... and RNG states)
    "checkpoint_interval": 60.0,  # seconds between epoch-end checkpoints; the last epoch and
    # Ctrl-C always write one (0 = after every epoch)
    "threads": 0,  # torch intra-op threads; 0 = leave torch's default
    "precision": "fp32",  # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)
    "channels_last": False,  # 4-D weights and inputs in channels-last memory format
    "compile": False,  # torch.compile the model for training
    "compile_backend": "inductor",  # torch.compile backend (e.g. aot_eager to check quickly)
}

DATA_DEFAULTS: dict[str, object] = {
    "name": "digits",
    "root": None,
    "resize": None,
    "standardize": True,
    "crop_padding": 0,
    "padding_mode": "reflect",
    "flip": 0.0,
    "drop_last": False,
    "train_limit": None,
    "test_limit": None,
    "svhn_extra": False,  # data=svhn: append extra_32x32.mat to the training split
}


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric option: ``low <= value <= high`` (strict where ``*_open``).

    ``None`` always passes (it means "off" or "derived" for the options that allow it).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


NON_NEGATIVE = Bound(0.0)
POSITIVE = Bound(0.0, low_open=True)
PROBABILITY = Bound(0.0, 1.0)

TOP_LEVEL_BOUNDS: dict[str, Bound] = {
    "epochs": NON_NEGATIVE,
    "batch_size": Bound(1),
    "eval_batch_size": Bound(1),
    "checkpoint_interval": NON_NEGATIVE,
    "threads": NON_NEGATIVE,
}

DATA_BOUNDS: dict[str, Bound] = {
    "resize": Bound(1),
    "crop_padding": NON_NEGATIVE,
    "flip": PROBABILITY,
    "train_limit": NON_NEGATIVE,
    "test_limit": NON_NEGATIVE,
}


def check_bounds(section: str, values: Mapping, bounds: Mapping[str, Bound]) -> None:
    """Raise :class:`ConfigError` for the first option of ``values`` outside its bound."""
    for key, bound in bounds.items():
        if key in values and not bound.holds(values[key]):
            label = f"{section}.{key}" if section else key
            raise ConfigError(f"{label} must be {bound.describe()}, got {values[key]!r}")


@dataclass
class NamedSection:
    """A config section whose options depend on the chosen name (model, optim, schedule)."""

    default_name: str
    names: Callable[[], Iterable[str]]
    options: Callable[[str], dict]  # name -> {option: default}
    help: str = ""
    bounds: Callable[[str], Mapping[str, Bound]] = lambda name: {}  # name -> {option: Bound}


@dataclass
class Extension:
    """An optional part of a run, switched on by giving its section a value.

    ``callback`` is a :class:`normlab.train.Callback` class (or any factory): its keyword
    parameters with defaults are the section's options, read from its signature as model options
    are, so each option is written once. A callback that forwards ``**options`` to the component
    it wraps says where they come from with a ``config_options()`` class method. ``internal`` names
    parameters that are not options.
    """

    name: str
    callback: Callable
    help: str = ""
    bounds: dict[str, Bound] = field(default_factory=dict)
    internal: tuple[str, ...] = ()
    presets: dict[str, dict] = field(default_factory=dict)  # ``NAME=PRESET``: named option sets

    @property
    def defaults(self) -> dict:
        declared = getattr(self.callback, "config_options", None)
        options = declared() if declared is not None else signature_options(self.callback)
        return {k: copy.deepcopy(v) for k, v in options.items() if k not in self.internal}

    def build(self, state, options: dict):
        """The callback for a run with the section's resolved ``options``."""
        return self.callback(**options)


def signature_options(fn: Callable, skip: Iterable[str] = ()) -> dict:
    """``{name: default}`` of the keyword parameters of ``fn`` that have a default."""
    skip = set(skip)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty
        and p.name not in skip
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


_NAMED: dict[str, NamedSection] = {}
_EXTENSIONS: dict[str, Extension] = {}


def register_named_section(key: str, section: NamedSection) -> None:
    _NAMED[key] = section


def register_extension(extension: Extension, *, overwrite: bool = False) -> None:
    """Add an optional config section (``enorm``, ``sphere_metrics``, ...)."""
    if extension.name in _EXTENSIONS and not overwrite:
        raise ValueError(f"extension {extension.name!r} is already registered")
    if extension.name in TOP_LEVEL_DEFAULTS or extension.name in _NAMED or extension.name == "data":
        raise ValueError(f"extension name {extension.name!r} clashes with a config key")
    _EXTENSIONS[extension.name] = extension


def extensions() -> dict[str, Extension]:
    load_methods()
    return dict(_EXTENSIONS)


# ------------------------------------------------------------------------------ parsing values
def parse_value(text: str):
    """Parse a command-line value: booleans, None, ints, floats (``1e-5`` too), ``[a, b]`` lists,
    JSON objects; anything else stays a string."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "~"):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        pass
    if (s.startswith("[") and s.endswith("]")) or (s.startswith("{") and s.endswith("}")):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            if s.startswith("["):
                inner = s[1:-1].strip()
                return [parse_value(p) for p in inner.split(",")] if inner else []
            raise ConfigError(f"cannot parse {text!r} as a JSON object") from None
    return s


def parse_overrides(items: Iterable[str]) -> dict:
    """``["optim.lr=0.1", "model=vgg"]`` -> nested dict ``{"optim": {"lr": 0.1}, "model": "vgg"}``."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r} (for example optim.lr=0.1)")
        key, value = item.split("=", 1)
        set_dotted(nested, key.strip(), parse_value(value))
    return nested


def set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed key {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"name": child}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node.get(last), dict) and not isinstance(value, dict):
        node[last]["name"] = value  # "model=vgg" after "model.depth=11"
    else:
        node[last] = value


def get_dotted(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def load_config_file(path: str | Path) -> dict:
    """Read a ``.json`` or ``.yaml``/``.yml`` config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


# ------------------------------------------------------------------------------ resolution
def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (a plain value for a dict picks its name)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif not isinstance(value, dict) and isinstance(out.get(key), dict) and key in _NAMED:
            out[key] = {**out[key], "name": value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config: dict | None = None, overrides: Iterable[str] = ()) -> dict:
    """The complete, validated config for ``config`` (a nested dict) plus dotted overrides."""
    user = merge(config or {}, parse_overrides(overrides))
    resolved: dict = {}
    for key, default in TOP_LEVEL_DEFAULTS.items():
        resolved[key] = _coerce(key, user.get(key, default), default)
    check_bounds("", resolved, TOP_LEVEL_BOUNDS)
    resolved["data"] = _resolve_options(
        "data", _as_section(user.get("data"), "data"), DATA_DEFAULTS
    )
    check_bounds("data", resolved["data"], DATA_BOUNDS)
    for key, section in _NAMED.items():
        given = _as_section(user.get(key), key)
        name = given.get("name", section.default_name)
        valid = list(section.names())
        if name not in valid:
            raise ConfigError(f"unknown {key} {name!r}; valid choices: {', '.join(valid)}")
        resolved[key] = _resolve_options(key, given, {"name": name, **section.options(name)})
        check_bounds(key, resolved[key], section.bounds(name))
    for name, ext in extensions().items():
        given = user.get(name)
        if given is None or given is False:
            resolved[name] = None
            continue
        if given is True:
            given = {}
        if isinstance(given, str) and given in ext.presets:
            given = dict(ext.presets[given])
        if not isinstance(given, dict):
            presets = "".join(f", {name}={p}" for p in ext.presets)
            raise ConfigError(
                f"{name} takes true/false{presets} or {name}.OPTION=VALUE, got {given!r}"
            )
        resolved[name] = _resolve_options(name, given, dict(ext.defaults))
        check_bounds(name, resolved[name], ext.bounds)
    known = set(TOP_LEVEL_DEFAULTS) | {"data"} | set(_NAMED) | set(_EXTENSIONS)
    unknown = sorted(set(user) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(known))}"
        )
    _check_top_level(resolved)
    return resolved


def _as_section(value, key: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {"name": value}


def _resolve_options(section: str, given: dict, defaults: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        label = f"{section} {defaults['name']!r}" if "name" in defaults else section
        valid = ", ".join(k for k in defaults if k != "name")
        raise ConfigError(f"{label} has no option(s) {unknown}; valid options: {valid}")
    out = {}
    for key, default in defaults.items():
        out[key] = _coerce(f"{section}.{key}", given.get(key, default), default)
    return out


def _coerce(key: str, value, default):
    """Bring ``value`` to the type of ``default`` where that is unambiguous."""
    if value is None and isinstance(default, str):
        # "none" on the command line parses to None; for a string option (model.norm=none) it
        # names the choice "none".
        return "none"
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if isinstance(default, list | tuple) and not isinstance(value, list | tuple):
        return [value]
    return value


def _check_top_level(cfg: dict) -> None:
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, got {cfg['precision']!r}")
    device = cfg["device"]
    if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def run_name(cfg: dict) -> str:
    """The default run name: data-model-norm-optimizer-sSEED."""
    if cfg.get("name"):
        return str(cfg["name"])
    norm = cfg["model"].get("norm")
    parts = [cfg["data"]["name"], cfg["model"]["name"]]
    if norm:
        parts.append(str(norm))
    parts += [cfg["optim"]["name"], f"s{cfg['seed']}"]
    return "-".join(parts)


__all__ = [
    "Bound",
    "NON_NEGATIVE",
    "POSITIVE",
    "PROBABILITY",
    "check_bounds",
    "Extension",
    "NamedSection",
    "TOP_LEVEL_DEFAULTS",
    "DATA_DEFAULTS",
    "get_dotted",
    "load_config_file",
    "merge",
    "parse_overrides",
    "parse_value",
    "register_extension",
    "register_named_section",
    "resolve",
    "run_name",
    "set_dotted",
    "signature_options",
]
