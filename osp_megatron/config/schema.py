"""Typed-dataclass machinery behind every config section: strict parsing, documented fields, YAML input.

A section is a dataclass whose fields are declared with `option(default, "one line of meaning", choices=...)`.
`from_dict(cls, data, path)` builds it from plain data (YAML, `key=value` overrides) and refuses, with one
`ConfigError` naming the field and the fix:
- unknown keys at any level (with the closest valid key: `trian` -> did you mean `train`?);
- a non-integer value for an integer field (`train.steps=2.9`), NaN/inf for a float field, a value outside
  `choices`, a wrong container type.
`load_yaml` refuses duplicate keys (a second `train:` block would silently replace the first) and reports
syntax errors with the file and line. `fields_reference` walks the tree for the generated config reference.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names each bad field and how to fix it."""


def option(default: Any = MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           choices: Optional[Sequence[Any]] = None, minimum: Optional[float] = None, several: bool = False) -> Any:
    """A documented dataclass field. `choices`: the allowed values (checked when parsing, listed in the
    reference); `minimum`: a lower bound checked when parsing (`>= minimum`); `several`: a string field that takes
    one or more of `choices`, comma-separated (`a,b`) or as a YAML list (`[a, b]`, stored as `a,b`)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if several:
        meta["several"] = True
    if minimum is not None:
        meta["minimum"] = minimum
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(name: str, candidates: Sequence[str]) -> str:
    """' (did you mean `x`?)' for the nearest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def coerce(tp: Any, value: Any, path: str, meta: Optional[Dict[str, Any]] = None,
           errors: Optional[List[str]] = None, deferred: Optional[List[str]] = None) -> Any:
    """`value` as type `tp` (strict; see the module docstring), checked against the field metadata.

    Problems that leave no usable value (unknown keys, wrong types, non-integers) go to `errors`; a NaN/inf
    number or a value outside `choices` or below `minimum` is kept and its problem goes to `deferred` (reported when the
    config is validated). Without lists the first problem is raised."""
    own: List[str] = [] if errors is None else errors
    later: List[str] = own if deferred is None else deferred
    meta = meta or {}
    if meta.get("several") and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)  # a YAML list -> the comma-separated form
    out = _coerce(tp, value, path, own, later)
    if meta.get("several") and isinstance(out, str):
        out = _several(out, path, meta.get("choices", ()), later)
    elif out is not _UNUSABLE and out is not None:
        if "choices" in meta and out not in meta["choices"]:
            later.append(f"{path}={out!r}: use one of {', '.join(str(c) for c in meta['choices'])}"
                         + (closest(out, [str(c) for c in meta["choices"]]) if isinstance(out, str) else ""))
        elif "minimum" in meta and isinstance(out, (int, float)) and out < meta["minimum"]:
            later.append(f"{path}={out!r}: must be >= {meta['minimum']}")
    if errors is None and own:
        raise ConfigError(own[0])
    return out


def _several(text: str, path: str, choices: Sequence[Any], problems: List[str]) -> str:
    """`a, b,a` -> `a,b` (stripped, duplicates dropped); an empty item or one outside `choices` goes to `problems`."""
    items = [item.strip() for item in text.split(",")]
    allowed = [str(c) for c in choices]
    bad = [item for item in items if not item or (allowed and item not in allowed)]
    if bad:
        first = bad[0]
        problems.append(f"{path}={text!r}: {first!r} is not allowed; use one or more of {', '.join(allowed)}, "
                        f"comma-separated (e.g. {path}={','.join(allowed[:2])})"
                        + (closest(first, allowed) if first else ""))
        return text
    return ",".join(dict.fromkeys(items))


_UNUSABLE = object()  # a value that could not be read (its problem is in `errors`; the field keeps its default)


def _coerce(tp: Any, value: Any, path: str, errors: List[str], deferred: List[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, errors, deferred)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return build(tp, value, path, errors, deferred)
    if origin in (list, List, Sequence, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return []
        return [_coerce(args[0] if args else Any, v, f"{path}[{i}]", errors, deferred) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    try:
        out = _scalar(tp, value, path)
    except ConfigError as exc:
        errors.append(str(exc))
        return _UNUSABLE
    if tp is float and not math.isfinite(out):
        deferred.append(f"{path}={value!r}: must be a finite number")
    return out


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        return out
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: Any, data: Dict[str, Any], path: str, errors: List[str], deferred: Optional[List[str]] = None) -> Any:
    """Dataclass `cls` from `data`, appending every problem to `errors` (unusable values keep their defaults) or,
    for out-of-range values, to `deferred` (default: `errors`)."""
    deferred = errors if deferred is None else deferred
    preset = getattr(cls, "expand_preset", None)  # a section with presets (grpo.recipe) fills them in under `data`
    if preset is not None and isinstance(data, dict):
        data = preset(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        guesses = [(k, difflib.get_close_matches(k, list(fields), n=1, cutoff=0.5)) for k in unknown]
        hint = ", ".join(f"`{m[0]}` for `{k}`" for k, m in guesses if m)
        errors.append(f"{path or 'config'}: unknown field(s) {unknown}" + (f" (did you mean {hint}?)" if hint else "")
                      + f"; valid fields are {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            continue
        out = coerce(hints[key], value, _join(path, key), dict(fields[key].metadata), errors, deferred)
        if out is not _UNUSABLE:
            kwargs[key] = out  # an unreadable value keeps the default, so later checks still run
    return cls(**kwargs)


def from_dict(cls: Any, data: Dict[str, Any], path: str = "", deferred: Optional[List[str]] = None) -> Any:
    """Build dataclass `cls` from `data`; every key must be a field (nested sections recurse). Raises one
    ConfigError listing every problem, one line each; with `deferred`, out-of-range values are kept and their
    problems appended there instead."""
    errors: List[str] = []
    out = build(cls, data, path, errors, deferred)
    if errors:
        raise ConfigError("\n  - ".join(errors))
    return out


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
    seen: Dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: key `{key}` appears twice in one mapping (the second would "
                f"silently replace the first, first at line {seen[key] + 1}); merge the two into one"
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Dict[str, Any]:
    """A YAML mapping from `path`, strictly: duplicate keys and syntax errors are ConfigErrors naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file or a preset name")
    try:
        loaded = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, parallel, ...)")
    return loaded


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (`1e-4`, `[1, 2]`, `{frames: 17}`, `true`); plain text otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict, in place (keys are checked when the tree is built)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        node = data
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = node[p]
        node[parts[-1]] = parse_value(raw)
    return data


# --------------------------------------------------------------------------------------------
# views of a tree
# --------------------------------------------------------------------------------------------
def flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dict -> dotted key -> scalar (lists as JSON), e.g. for tracking params."""
    out: Dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, _join(prefix, str(k))))
    else:
        out[prefix] = json.dumps(data) if isinstance(data, (list, tuple)) else data
    return out


@dataclass
class FieldDoc:
    key: str  # dotted path, e.g. train.lr
    type: str
    default: Any
    help: str
    choices: Tuple[Any, ...] = ()
    several: bool = False  # one or more of `choices`, comma-separated


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin in (list, List, Sequence, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def fields_reference(cls: Any, prefix: str = "") -> Iterator[FieldDoc]:
    """Every leaf key of section `cls` (nested sections and list-of-section items expanded)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(prefix, f.name)
        inner = tp
        if typing.get_origin(tp) is typing.Union:
            inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if dataclasses.is_dataclass(inner):
            yield from fields_reference(inner, key)
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        if typing.get_origin(inner) in (list, List) and typing.get_args(inner) and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            item = typing.get_args(inner)[0]
            default = [dataclasses.asdict(d) for d in default] if default else default
            yield FieldDoc(key, _type_name(tp), default, f.metadata.get("help", ""), ())
            yield from fields_reference(item, key + "[]")
            continue
        yield FieldDoc(key, _type_name(tp), default, f.metadata.get("help", ""), tuple(f.metadata.get("choices", ())),
                       bool(f.metadata.get("several")))


__all__ = [
    "ConfigError", "FieldDoc", "apply_overrides", "build", "closest", "coerce", "fields_reference", "flatten", "from_dict",
    "load_yaml", "option", "parse_value",
]
