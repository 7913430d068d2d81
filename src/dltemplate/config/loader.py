"""Load, override, validate and save the configuration.

YAML file -> dict -> ``section.key=value`` overrides -> typed :class:`Config`. Every problem
(unknown section or key, wrong type, value out of choices) is a :class:`ConfigError` naming the
key and suggesting the closest valid one; nothing has run yet when it is raised.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import signal
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dltemplate.config.schema import Config
from dltemplate.errors import ConfigError, did_you_mean, short_repr
from dltemplate.registry import is_code_name

MAX_DEPTH = 64  # levels of nesting a config may have (a config needs a handful)
MAX_VALUES = 100_000  # values a document may expand to through aliases (a bomb: billions)


class RefusedYAML(yaml.MarkedYAMLError):
    """YAML that parses but is refused: too deep, too large once its aliases are expanded, or a
    mapping that names a key twice."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader that reads ``1e-3`` as the float users mean (YAML 1.1 reads a string), and
    refuses before building anything a document nested deeper than :data:`MAX_DEPTH`, one that
    expands through aliases to more than :data:`MAX_VALUES` values, and a key given twice in one
    mapping (the last would silently win)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node, counting how deep it lies (an alias adds no depth)."""
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RefusedYAML(
                    problem=f"nested more than {MAX_DEPTH} levels deep",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        """The document's node graph, checked for its expanded size and repeated keys."""
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}
            if _expanded_size(node, sizes, []) > MAX_VALUES:
                raise RefusedYAML(
                    problem=f"expands through its aliases (*name) to more than {MAX_VALUES:,} "
                    "values",
                    problem_mark=node.start_mark,
                )
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], path: list[str]) -> int:
    """How many values ``node`` stands for once aliases are expanded (each shared node counted
    once per use, computed once); raises :class:`RefusedYAML` for a key given twice."""
    if id(node) in sizes:
        return sizes[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, path) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                if name in seen:
                    where = ".".join([*path, name])
                    raise RefusedYAML(
                        problem=f"key '{where}' is given twice (lines {seen[name] + 1} and "
                        f"{key.start_mark.line + 1}); keep one",
                        problem_mark=key.start_mark,
                    )
                seen[name] = key.start_mark.line
            total += _expanded_size(key, sizes, path)
            total += _expanded_size(value, sizes, [*path, str(name)])
    sizes[id(node)] = total
    return total


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text, reading ``1e-3`` as a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and str(value) in choices
        ):
            value = str(value)  # `precision: 32` in YAML is an int
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in choices:
            raise ConfigError(
                f"{key}={short_repr(value)}: must be one of {', '.join(map(str, choices))}"
                + did_you_mean(str(value), map(str, choices))
            )
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # before a mapping option, which would read null as no arguments
        errors = []
        for option in typing.get_args(tp):
            try:
                return check_value(value, option, key)
            except ConfigError as exc:
                container = typing.get_origin(option)
                if container in (list, dict) and isinstance(value, container):
                    raise  # the list's own error names the item: `gpu_devices[0]=None`
                errors.append(exc)
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(
            f"{key}={short_repr(value)}: expected {names}, got {type(value).__name__}"
        )
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}={short_repr(value)}: expected null")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(
                f"{key}={short_repr(value)}: expected a list, got {type(value).__name__}"
            )
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:  # `args:` left empty: no arguments
            return {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}={short_repr(value)}: expected a mapping, got {type(value).__name__}"
            )
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={short_repr(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{key}={short_repr(value)}: expected an integer, got {type(value).__name__}"
            )
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{key}={short_repr(value)}: expected a number, got {type(value).__name__}"
            )
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` is meant as text
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}={short_repr(value)}: expected a string, got {type(value).__name__}"
            )
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def config_keys() -> list[str]:
    """Every ``section.key`` a config may set, in the schema's order (list sections by name)."""
    keys = []
    for name, tp in _section_types().items():
        if typing.get_origin(tp) is list:
            keys.append(name)
        else:
            keys += [f"{name}.{f.name}" for f in dataclasses.fields(tp)]
    return keys


def check_depth(raw: Any, source: str, limit: int = MAX_DEPTH) -> None:
    """A ConfigError naming the first key path nested deeper than ``limit`` levels (checked
    without recursion: a hostile JSON file may nest 100,000 levels)."""
    todo: list[tuple[Any, str, int]] = [(raw, "", 0)]
    seen: set[int] = set()
    while todo:
        value, where, depth = todo.pop()
        if not isinstance(value, (dict, list)) or id(value) in seen:
            continue
        seen.add(id(value))
        if depth >= limit:
            raise ConfigError(
                f"{source}: {where or 'the config'} is nested more than {limit} levels deep"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            path = f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
            todo.append((child, path.lstrip("."), depth + 1))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated :class:`Config` from nested dicts; missing keys take their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    check_depth(raw, source)
    sections = _section_types()
    built = {}
    for name, values in raw.items():
        refuse_unknown_key(name, None, source)
        if typing.get_origin(sections[name]) is list:  # a list section (callbacks)
            (item_cls,) = typing.get_args(sections[name])
            built[name] = _list_section(values, item_cls, name, source)
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        cls = sections[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            refuse_unknown_key(name, key, source)
            kwargs[key] = check_value(value, hints[key], f"{name}.{key}")
        built[name] = cls(**kwargs)
    cfg = Config(**built)
    check_values(cfg, source)
    return cfg


SEED_LIMIT = 2**32  # NumPy's seeds are below it; torch's overflow far above


def check_values(cfg: Config, source: str = "config") -> None:
    """The rules on values that types alone do not say (a positive number of epochs, a finite
    learning rate, ...): a ConfigError naming the key and value for the first one broken."""
    e, d, o, t = cfg.experiment, cfg.data, cfg.optimizer, cfg.trainer
    rules: list[tuple[bool, str, Any, str]] = [
        (0 <= e.seed < SEED_LIMIT, "experiment.seed", e.seed, "must be in [0, 2**32)"),
        (
            e.name not in ("", ".", "..") and not any(sep in e.name for sep in "/\\"),
            "experiment.name",
            e.name,
            "must be a plain name (no path separator): it names files in the run directory",
        ),
        (
            len(e.name) <= MAX_NAME,
            "experiment.name",
            e.name,
            f"too long ({len(e.name)} characters; at most {MAX_NAME}): it names files",
        ),
        (
            e.run_name is None or RUN_NAME.fullmatch(e.run_name) is not None,
            "experiment.run_name",
            e.run_name,
            f"must be 1 to {MAX_RUN_NAME} letters, digits or . _ = + , @ - (not starting with "
            "'.'; or null: named from the config and overrides): it names the run directory",
        ),
        (t.epochs >= 1, "trainer.epochs", t.epochs, "must be at least 1"),
        (
            e.threads is None or e.threads >= 1,
            "experiment.threads",
            e.threads,
            "must be at least 1 (or null)",
        ),
        (
            t.grad_accum_steps >= 1,
            "trainer.grad_accum_steps",
            t.grad_accum_steps,
            "must be at least 1",
        ),
        (
            math.isfinite(t.early_stopping_min_delta) and t.early_stopping_min_delta >= 0,
            "trainer.early_stopping_min_delta",
            t.early_stopping_min_delta,
            "must be a finite number >= 0",
        ),
        (d.batch_size >= 1, "data.batch_size", d.batch_size, "must be at least 1"),
        (
            d.eval_batch_size is None or d.eval_batch_size >= 1,
            "data.eval_batch_size",
            d.eval_batch_size,
            "must be at least 1 (or null: twice data.batch_size)",
        ),
        (math.isfinite(o.lr) and o.lr >= 0, "optimizer.lr", o.lr, "must be a number >= 0"),
        (
            math.isfinite(o.weight_decay) and o.weight_decay >= 0,
            "optimizer.weight_decay",
            o.weight_decay,
            "must be a number >= 0",
        ),
        (0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)"),
        (0 <= d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in [0, 1)"),
        *(
            (0 < rate <= 1, f"data.{name}", rate, "must be in (0, 1]")
            for name, rate in (
                ("train_val_sample_rate", d.train_val_sample_rate),
                ("test_sample_rate", d.test_sample_rate),
            )
        ),
        *(
            (
                limit is None or (limit >= 1 if isinstance(limit, int) else 0 < limit <= 1),
                f"trainer.{name}",
                limit,
                "a fraction must be in (0, 1]; use an int for a count"
                if isinstance(limit, float)
                else "must be at least 1",
            )
            for name, limit in (
                ("limit_train_batches", t.limit_train_batches),
                ("limit_val_batches", t.limit_val_batches),
                ("limit_test_batches", t.limit_test_batches),
            )
        ),
        (
            d.val_fraction > 0 or not t.monitor.startswith("val/") or t.overfit_batches > 0,
            "data.val_fraction",
            d.val_fraction,
            f"leaves no validation split, yet trainer.monitor={t.monitor} is a validation "
            f"metric: monitor a train/ metric (trainer.monitor=train/{t.monitor[4:]}) or keep "
            "a validation split",
        ),
        (
            t.log_every_n_steps >= 1,
            "trainer.log_every_n_steps",
            t.log_every_n_steps,
            "must be at least 1",
        ),
        (
            t.clip_grad_norm is None or t.clip_grad_norm > 0,
            "trainer.clip_grad_norm",
            t.clip_grad_norm,
            "must be > 0 (or null: no clipping)",
        ),
        (
            t.clip_grad_value is None or t.clip_grad_value > 0,
            "trainer.clip_grad_value",
            t.clip_grad_value,
            "must be > 0 (or null: no clipping)",
        ),
        (
            t.early_stopping_patience is None or t.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            t.early_stopping_patience,
            "must be at least 1 (or null: no early stopping)",
        ),
        (d.num_workers >= 0, "data.num_workers", d.num_workers, "must be 0 or more"),
        (d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "must be at least 1"),
        (
            d.timeout is None or (math.isfinite(d.timeout) and d.timeout > 0),
            "data.timeout",
            d.timeout,
            "must be a finite number of seconds > 0 (or null: wait forever for a sample)",
        ),
        (t.fast_dev_run >= 0, "trainer.fast_dev_run", t.fast_dev_run, "must be 0 (off) or more"),
        (
            t.overfit_batches >= 0,
            "trainer.overfit_batches",
            t.overfit_batches,
            "must be 0 (off) or more",
        ),
    ]
    for ok, key, value, rule in rules:
        if not ok:
            raise ConfigError(f"{source}: {key}={short_repr(value)}: {rule}")
    if e.cudnn_benchmark and e.deterministic:
        raise ConfigError(f"{source}: {CUDNN_CONFLICT}")
    if t.notice_signal is not None:
        try:
            notice_signal(t.notice_signal)
        except ValueError as exc:
            said = f"trainer.notice_signal={t.notice_signal!r}: {exc}"
            raise ConfigError(f"{source}: {said}") from exc
    args = {f"{name}.args": getattr(cfg, name).args for name in SECTIONS_WITH_ARGS}
    args["data.test_args"] = d.test_args or {}
    for i, item in enumerate(cfg.callbacks):
        args[f"callbacks[{i}] '{item.name}' args"] = item.args
    for where, values in args.items():
        for key, value in _numbers(values):
            if not math.isfinite(value):
                raise ConfigError(
                    f"{source}: {where}.{key}={value!r}: must be a finite number (NaN and "
                    "infinities are not accepted)"
                )


def notice_signal(name: str) -> signal.Signals:
    """The signal ``trainer.notice_signal`` names (``SIGUSR1``, ``USR1``, ``SIGUSR2``...): one a
    process may catch, and not SIGINT or SIGTERM, which stop a run without a requeue."""
    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        sig = signal.Signals[full]
    except KeyError:
        raise ValueError("not a signal name (e.g. SIGUSR1, SIGUSR2)") from None
    if sig in (signal.SIGINT, signal.SIGTERM) or full in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{full} cannot be the notice (choose SIGUSR1 or SIGUSR2, say)")
    return sig


CUDNN_CONFLICT = (
    "experiment.cudnn_benchmark=true conflicts with experiment.deterministic=true: autotuning "
    "may choose another kernel after a restart; set one of them to false"
)
SECTIONS_WITH_ARGS = ("data", "model", "loss", "optimizer", "scheduler")
MAX_NAME = 100  # characters of experiment.name: it names files (and a file name has 255 bytes)
MAX_RUN_NAME = 100  # characters of experiment.run_name: with the timestamp, a folder's name
RUN_NAME = re.compile(rf"[A-Za-z0-9_=+,@-][A-Za-z0-9._=+,@-]{{0,{MAX_RUN_NAME - 1}}}")
DEFAULT_RUN_NAME = 80  # characters of a run name made from the config and overrides
# Overrides that say where or how a run goes, not what it is: left out of its default name.
UNNAMED_KEYS = frozenset(
    {
        "experiment.output_dir",
        "experiment.run_name",
        "experiment.threads",
        "experiment.device",
        "experiment.gpu_devices",
        "data.root",
        "data.num_workers",
        "trainer.resume",
        "trainer.progress_bar",
    }
)


def default_run_name(path: str | Path | None, overrides: list[str]) -> str | None:
    """A short, folder-safe name for a run of the config file ``path`` with ``overrides``:
    the file's stem, then ``key=value`` for each override (the key's last part, the section
    for a ``name``; floats to 4 significant digits), e.g. ``digits_mlp_lr=0.01_hidden=128,64``
    or ``unet_carvana_model=UNet++``; at most
    :data:`DEFAULT_RUN_NAME` characters; None when there is nothing to name it by."""
    parts = [Path(path).stem] if path is not None else []
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() in UNNAMED_KEYS:
            continue
        words = [w for w in key.strip().split(".") if w != "args"]  # loss.args={...}: loss
        if len(words) > 1 and words[-1] == "name":  # model.name=UNet: model=UNet
            words.pop()
        parts.append(f"{words[-1] if words else 'args'}={_short_value(value)}")
    parts = [re.sub(r"[^A-Za-z0-9._=+,@-]+", "-", part) for part in parts]
    name = ""
    for i, part in enumerate(parts):  # whole parts while they fit; "+N": N more not shown
        more = f"_+{len(parts) - i}"
        if name and len(name) + 1 + len(part) > DEFAULT_RUN_NAME - len(more):
            name += more
            break
        name = f"{name}_{part}" if name else part
    name = name.lstrip(".")[:DEFAULT_RUN_NAME].rstrip("-_.,=@")
    return name or None


def _short_value(text: str) -> str:
    """An override's value as a run name shows it: ``[128, 64]`` as ``128,64``,
    ``0.0031622776`` as ``0.003162``, ``{a: 1}`` as ``a=1``."""
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text.strip()

    def short(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return ",".join(short(x) for x in v)
        if isinstance(v, dict):
            return ",".join(f"{k}={short(x)}" for k, x in v.items())
        return str(v).lower() if isinstance(v, bool) or v is None else str(v)

    return short(value)


def _numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    """Every float in ``value`` (nested mappings and lists), with its key path."""
    if isinstance(value, float):
        return [(key, value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{key}.{k}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{key}[{i}]")]
    return []


def _list_section(values: Any, cls: type, name: str, source: str) -> list[Any]:
    """A list of ``cls`` items, each a mapping of its keys or just its ``name``."""
    if values is None:
        return []
    if not isinstance(values, list):
        raise ConfigError(f"{source}: section '{name}' must be a list, e.g. {name}: [grad_norm]")
    hints = typing.get_type_hints(cls)
    items = []
    for i, item in enumerate(values):
        where = f"{name}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where}: expected a name or a mapping with 'name'")
        for key in item:
            if key not in hints:
                valid = [f"{where}.{k}" for k in hints]
                raise ConfigError(
                    f"{source}: unknown key '{where}.{key}'{did_you_mean(f'{where}.{key}', valid)}"
                )
        if "name" not in item:
            raise ConfigError(f"{source}: {where}: 'name' is missing")
        items.append(cls(**{k: check_value(v, hints[k], f"{where}.{k}") for k, v in item.items()}))
    return items


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (JSON/YAML-ready)."""
    return dataclasses.asdict(cfg)


def config_to_raw(cfg: Config) -> dict[str, Any]:
    """``cfg`` as nested dicts holding every attribute set on it, fields or not, so that
    :func:`config_from_dict` validates a config built in code exactly as it validates YAML (a
    misspelt key set by attribute is an unknown key, ``epochs="3"`` a wrong type)."""

    def raw(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: raw(v) for k, v in vars(value).items()}
        if isinstance(value, list):
            return [raw(v) for v in value]
        return copy.deepcopy(value)

    return raw(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    whole_list = (
        "callbacks is a list, set whole: e.g. "
        'callbacks=[grad_norm] or "callbacks=[{name: ema, args: {decay: 0.99}}]"'
    )
    if path[0] == "callbacks" and path != ["callbacks"]:
        raise ConfigError(f"override '{text}': {whole_list}")
    if path != ["callbacks"] and (len(path) < 2 or not all(path)):
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. trainer.epochs=5")
    parsed = _override_value(text, key, value)
    if path == ["callbacks"]:  # the one list section: replaced whole
        if parsed is None:
            return path, []
        if not isinstance(parsed, list):
            said = whole_list.replace("is a list, set whole", "must be a list, set whole")
            raise ConfigError(f"override '{_cut(text)}': {said}")
    return path, parsed


def _override_value(text: str, key: str, value: str) -> Any:
    """The YAML value of the override ``text`` (``key=value``): a plain word YAML cannot read
    is taken as a string; a value meant as YAML that does not parse is a ConfigError with a
    quoting hint."""
    try:
        return yaml_load(value) if value.strip() else None
    except RefusedYAML as exc:
        raise ConfigError(f"override '{_cut(text)}'{_yaml_error(exc)}") from exc
    except yaml.YAMLError as exc:
        opener = value.lstrip()[:1]
        if opener not in _YAML_EXAMPLES and not any(c.isspace() for c in value):
            return value  # a plain word YAML cannot read (`@home`): taken as a string
        # `[128` or `{a: 1` unbalanced (the shell may have split it at a space): never a string
        why = _yaml_error(exc).split("not valid YAML: ", 1)[-1]
        if opener in _YAML_EXAMPLES:
            example = _YAML_EXAMPLES[opener]
            if key.strip() == "callbacks" and opener == "[":
                example = "[{name: ema, args: {decay: 0.99}}]"
            hint = (
                "if it holds spaces, quote the whole override so that the shell passes it as "
                f'one argument, e.g. "{key.strip()}={example}"'
            )
        else:
            hint = f"""text with spaces and colons needs YAML quotes, e.g. '{key.strip()}="..."'"""
        raise ConfigError(f"override '{_cut(text)}': not valid YAML ({why}); {hint}") from exc


def _cut(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (with ``...``) for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A value starting so is meant as YAML, not as text; the example a message shows for each.
_YAML_EXAMPLES = {"[": "[128, 64]", "{": "{a: 1, b: 2}", '"': '"a b"', "'": "'a b'"}


def check_override_key(text: str, path: list[str]) -> None:
    """A ConfigError if the override ``text`` (key path ``path``) names a section or key the
    schema lacks: the message names the override, so the typo is not blamed on the file."""
    refuse_unknown_key(path[0], path[1] if len(path) > 1 else None, f"override '{_cut(text)}'")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (deeper paths go into ``args``);
    an override naming an unknown section or key is a ConfigError naming the override."""
    for text in overrides:
        path, value = parse_override(text)
        check_override_key(text, path)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a mapping")
            node = child
        node[path[-1]] = value
    return raw


# The keys that decide which samples fall in which split: a run's eval and resume keep them.
SPLIT_KEYS = (
    "experiment.seed",
    "data.name",
    "data.val_fraction",
    "data.test_fraction",
    "data.train_val_sample_rate",
    "data.test_sample_rate",
)


def refuse_resplit(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """A ConfigError if the config ``now`` changes a key of :data:`SPLIT_KEYS` from the run's
    ``saved`` config (both as dicts of sections): the data would be split anew, and the run's
    test split would then hold samples it trained on. A dataset given in Python (``data.name:
    <code X>``) may be named otherwise now (``package.module:X``): the same data, by a name."""
    for key in SPLIT_KEYS:
        section, name = key.split(".")
        value = now.get(section, {}).get(name)
        was = saved.get(section, {}).get(name)
        if key == "data.name" and is_code_name(was):
            continue
        if was != value:
            raise ConfigError(
                f"{where}: {key}={short_repr(value)} would split the data anew, so the run's "
                f"test split would hold samples it trained on; {key} stays as the run was "
                "trained (leave it out, or train a new run)"
            )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict; a missing or broken file is a ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the config's YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml_load(path.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_error(exc)}") from exc
    except RecursionError as exc:  # deeper than Python's parser goes, before our own check
        raise ConfigError(f"{path}: nested too deep to read") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw.pop("_meta", None)  # versions saved beside the config in run directories
    return raw


def _yaml_error(exc: yaml.YAMLError) -> str:
    """``:LINE:COLUMN: not valid YAML: what`` on one line, from PyYAML's multi-line message."""
    mark = getattr(exc, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, RefusedYAML):
        return f"{where}: refused: {what}"
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {what}" + (f" ({context})" if context else "")


def base_path(name: str, folder: Path) -> Path:
    """A ``base:`` path as a file in ``folder`` wrote it (a config's or a sweep file's):
    absolute as it is, else relative to ``folder``, not to the working directory."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else folder / path


def merge_configs(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``, key by key: mappings merge to any depth; a list, a scalar or
    ``null`` in ``child`` replaces what ``base`` holds. Where ``child`` names another
    component (a ``name`` other than the base's), the base's ``args`` beside that name are
    dropped: they were the other component's. Neither argument is changed."""
    merged = copy.deepcopy(base)
    if "name" in child and child["name"] != merged.get("name"):
        merged.pop("args", None)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a config file and, when it names ``base: OTHER.yaml`` (relative to itself), the
    configs it builds on, to any depth: each file's keys override its base's (see
    :func:`merge_configs`). The result holds no ``base`` key. A cycle of bases, or a base that
    is missing or broken, is a ConfigError naming the files."""
    return merge_layers(read_config_layers(path))


def merge_layers(layers: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """The layers of :func:`read_config_layers` merged, each over the bases after it."""
    merged: dict[str, Any] = {}
    for _, layer in reversed(layers):
        merged = merge_configs(merged, layer)
    return merged


def read_config_layers(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, its keys)`` for a config file and each config it builds on through ``base:``,
    the file first and its deepest base last; no ``base`` keys left (see :func:`read_config`)."""
    chain: list[Path] = []
    file = Path(path)
    raw = read_yaml(file)
    layers = [(file, raw)]
    while "base" in raw:
        chain.append(file)
        name = raw.pop("base")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"{file}: base={short_repr(name)}: expected the path of the config this one "
                "builds on (relative to this file)"
            )
        file = base_path(name, file.parent)
        seen = [c.resolve() for c in chain]
        if file.resolve() in seen:
            cycle = " -> ".join(str(c) for c in chain[seen.index(file.resolve()) :])
            raise ConfigError(f"{chain[-1]}: base: configs build on each other in a cycle: "
                              f"{cycle} -> {file}")  # fmt: skip
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "not found"
            raise ConfigError(f"{chain[-1]}: base: {name}: {what} ({file}); give a config "
                              "file, relative to the one that names it")  # fmt: skip
        raw = read_yaml(file)
        check_keys(raw, str(file))  # a typo in a base names the base, not the config using it
        layers.append((file, raw))
    return layers


_KEY_AT_START = re.compile(r"([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?[=.\[]")


def _blamed(
    message: str, source: str, layers: list[tuple[Path, dict[str, Any]]], overrides: list[str]
) -> str:
    """``message`` (a ConfigError's, perhaps starting ``<source>: ``) as it should read: about
    a ``section.key=...`` value, it names the config file that set the key (the first of
    ``layers``: the file, then its bases), or nothing when an override set it (the override is
    in the message); any other message is left as it is."""
    bare = message.removeprefix(f"{source}: ")
    match = _KEY_AT_START.match(bare)
    if match is None:
        return message
    section, key = match.group(1), match.group(2)
    dotted = f"{section}.{key}" if key else section
    for override in overrides:
        name = override.split("=", 1)[0].strip()
        if name == dotted or name.startswith((dotted + ".", dotted + "[")):
            return bare
    for file, raw in layers:
        values = raw.get(section)
        if key is None and section in raw:
            return f"{file}: {bare}"
        if key is not None and isinstance(values, dict) and key in values:
            return f"{file}: {bare}"
    return message


def check_keys(raw: dict[str, Any], source: str) -> None:
    """A ConfigError naming ``source`` for the first section or key of ``raw`` that the schema
    lacks (``base`` aside); values are not checked (a base may be completed by its child)."""
    sections = _section_types()
    for name, values in raw.items():
        if name == "base":
            continue
        refuse_unknown_key(name, None, source)
        if typing.get_origin(sections[name]) is list or not isinstance(values, dict):
            continue  # checked whole by config_from_dict
        for key in values:
            refuse_unknown_key(name, key, source)


def refuse_unknown_key(section: str, key: str | None, source: str) -> None:
    """A ConfigError naming ``source`` (a file, or an override) when the schema has no
    ``section``, or (for a mapping section) no ``section.key``, with the nearest names."""
    sections = _section_types()
    if section not in sections:
        raise ConfigError(
            f"{source}: unknown config section '{section}'{did_you_mean(section, sections)}; "
            f"sections are {', '.join(sections)}"
        )
    if key is None or typing.get_origin(sections[section]) is list:
        return
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        dotted, valid = f"{section}.{key}", [f"{section}.{k}" for k in hints]
        raise ConfigError(f"{source}: unknown key '{dotted}'{did_you_mean(dotted, valid)}")


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, name_run: bool = True
) -> Config:
    """Read ``path`` (YAML or JSON, or nothing; with the configs it builds on through
    ``base:``), apply ``overrides`` and validate the result.

    With ``name_run``, an ``experiment.run_name`` that neither the file nor the overrides set
    is named after them (:func:`default_run_name`)."""
    layers = read_config_layers(path) if path is not None else []
    raw = merge_layers(layers)
    apply_overrides(raw, list(overrides or []))
    source = str(path) if path is not None else "config"
    try:
        cfg = config_from_dict(raw, source)
    except ConfigError as exc:
        blamed = _blamed(str(exc), source, layers, list(overrides or []))
        if blamed == str(exc):
            raise
        raise ConfigError(blamed) from None
    if name_run and cfg.experiment.run_name is None:
        cfg.experiment.run_name = default_run_name(path, list(overrides or []))
    return cfg
