"""Typed dataclass configs <-> command-line flags and YAML/JSON files.

Each config field carries its help text in ``field(metadata={"help": ...})``; the CLI is
generated from the dataclass, so flags, defaults, saved JSON and docs share one source.
Precedence: dataclass defaults < ``--config FILE`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["MAX_DIST_TIMEOUT", "read_json_object", "add_dataclass_arguments", "config_from_namespace",
           "load_config_file", "config_to_json", "field_help", "field_keys", "coerce_field_types",
           "unknown_command"]

T = TypeVar("T")

MAX_DIST_TIMEOUT = 1e8
"""Largest ``--dist-timeout`` (train and harvest) in seconds, ~3 years ("never" in practice):
``datetime.timedelta`` overflows past ~8.6e13 s, which killed every rank with an OverflowError."""


def field_help(help: str, **kwargs: Any) -> Any:
    """``dataclasses.field`` with help text stored for the CLI generator."""
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    return dataclasses.field(metadata=metadata, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


class _ListFlagOnce(argparse.Action):
    """A list flag given twice (``--models a --models b``) is refused: argparse would keep only the
    last list, silently dropping the first (a scalar flag given twice still keeps the last, which
    lets a script's defaults be overridden)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if hasattr(namespace, self.dest):
            parser.error(f"{option_string} given twice ({' '.join(map(str, getattr(namespace, self.dest)))} and "
                         f"{' '.join(map(str, values))}): list every value after one {option_string}")
        setattr(namespace, self.dest, list(values))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field. Flags not given are absent from the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        # argparse %-formats help strings: a literal "%" in a field's help (or default) must be doubled.
        help_text = f"{help_text} (default: {default!r})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        origin = get_origin(tp)
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin is Literal:
            choices = list(get_args(tp))
            parser.add_argument(_flag(f.name), type=type(choices[0]), choices=choices, **kw)
            continue
        if origin in (list, tuple):
            args = get_args(tp)
            elem = args[0] if args else str
            elem, _ = _unwrap_optional(elem)
            nargs: Any = "+" if origin is list or (len(args) == 2 and args[1] is Ellipsis) else len(args)
            nargs = f.metadata.get("nargs", nargs)  # "*": the flag alone gives an empty list
            if get_origin(elem) is Literal:
                parser.add_argument(_flag(f.name), nargs=nargs, choices=list(get_args(elem)), action=_ListFlagOnce,
                                    **kw)
            else:
                parser.add_argument(_flag(f.name), nargs=nargs, type=elem, action=_ListFlagOnce, **kw)
            continue
        if tp in (int, float, str):
            parser.add_argument(_flag(f.name), type=tp, metavar=f.name.upper() if not optional else None, **kw)
            continue
        raise TypeError(f"config field {cls.__name__}.{f.name}: unsupported type {tp!r} for the CLI")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in file ``path``; ``{}`` when it is missing, unreadable or not an object (for optional
    facts a report or card shows when present)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict of field values: JSON for ``.json``, YAML (a superset of
    JSON) for any other name. A file that does not parse raises ValueError naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    try:
        data = (json.loads(text, object_pairs_hook=_no_duplicate_keys) if path.suffix == ".json"
                else (yaml.load(text, Loader=_strict_yaml_loader()) or {}))
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"config file {path} is not valid {kind}: {e}") from None
    except _DuplicateKey as e:
        raise ValueError(f"config file {path} gives {e} twice: keep one") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    return field_keys(data, f"config file {path}")


def unknown_command(argv: list[str], commands: list[str], prog: str, main: str) -> str | None:
    """The error for a first argument that is neither a flag nor one of ``commands`` (a misspelt subcommand
    gave argparse's "unrecognized arguments" with no list), or None. ``main``: what ``prog`` does without one."""
    if not argv or argv[0].startswith("-") or argv[0] in commands:
        return None
    import difflib

    close = difflib.get_close_matches(argv[0], commands, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{prog}: unknown command {argv[0]!r}{hint}; the commands are {', '.join(commands)}, and without one "
            f"{prog} {main}, which takes flags only (see {prog} --help)")


def field_keys(values: dict[Any, Any], source: str) -> dict[str, Any]:
    """``values`` with dashed keys (as written on the command line) spelled as fields; refuses a key that is
    not text (YAML reads ``yes:``, ``on:`` or ``1:`` as a boolean or a number) and a field given twice
    (``eval-every`` beside ``eval_every``), naming ``source``."""
    out: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: key {key!r} ({type(key).__name__}) is not a field name; field names are text "
                             "(YAML reads yes/no/on/off and numbers as such: quote the key)")
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"{source}: field {name!r} is given twice (as {spelt[name]!r} and as {key!r}); keep one")
        out[name], spelt[name] = value, key
    return out


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def _strict_yaml_loader() -> type:
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _DuplicateKey(f"{key!r} (line {key_node.start_mark.line + 1})")
                if isinstance(key, typing.Hashable):
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def coerce_field_types(cfg: Any) -> None:
    """Check every field of a config dataclass against its type hint, converting in place what a
    config file or sweep spells loosely; raise ValueError naming the field otherwise.

    Why: YAML reads ``lr: 1e-4`` as the *string* "1e-4" (YAML 1.1 floats need a dot), and
    ``models: toy-base`` as a string that would be iterated as its characters. Accepted: numeric
    strings for int/float fields (an int must be integral: ``steps: 1e3`` is 1000), ints for
    floats, paths for strings, a lone string for a ``list[str]``, lists for tuples. Call first thing in
    ``__post_init__`` (works on frozen dataclasses too).
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        converted = _convert(value, hints[f.name], f.name)
        if f.metadata.get("path") and converted is not None:
            converted = _path_value(converted, f.name)
        if converted is not value:
            object.__setattr__(cfg, f.name, converted)


def _path_value(value: Any, name: str) -> Any:
    """A path field (``metadata={"path": True}``; a list of them too): ``~`` expanded, as a shell would have
    (a quoted ``'~/x'``, or one from a config file, was a folder named ``~``); an empty path refused, since it
    would mean the working folder."""
    if isinstance(value, list):
        return [_path_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise ValueError(f"{name}: an empty path (it would mean the current folder); give a folder or name")
    return os.path.expanduser(value) if value.startswith("~") else value


def _convert(value: Any, hint: Any, name: str) -> Any:
    tp, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: a value is required (got null/None)")
    origin = get_origin(tp)

    def bad(expected: str) -> ValueError:
        return ValueError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")

    if tp is bool:
        if isinstance(value, bool) or getattr(value, "dtype", None) == bool:  # numpy's bool_ too
            return bool(value)
        raise bad("true or false")
    if tp in (int, float):
        number = value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                number = int(text)  # exact for big integers, which float() would round
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise bad("an integer" if tp is int else "a number") from None
        # numbers.Real/Integral: numpy scalars (np.int64 is no int) count as numbers too.
        if isinstance(number, bool) or getattr(number, "dtype", None) == bool or not isinstance(number, numbers.Real):
            raise bad("an integer" if tp is int else "a number")
        if tp is float:
            return value if type(value) is float else float(number)
        if not isinstance(number, numbers.Integral):
            if not float(number).is_integer():
                raise bad("an integer")
            return int(number)
        return value if type(value) is int else int(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # out=Path("caches/x") from Python
            return os.fspath(value)
        raise bad("a string")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad("one of " + ", ".join(repr(c) for c in get_args(tp)))
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, str) and origin is list:
            value = [value]  # a lone name is a list of one
        elif hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
            value = value.tolist()  # a numpy array or tensor of ids
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise bad(f"{len(args)} values")
            items = [_convert(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{name}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            return tuple(items)
        return value if isinstance(value, list) and all(a is b for a, b in zip(items, value)) else items
    return value  # other types (Any, ...) are the config's own business


def _known_fields(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values``, refused if a key is not a field of ``cls`` (types are checked by the config's
    ``__post_init__``, :func:`coerce_field_types`)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if "config" in unknown and isinstance(values.get("config"), dict):
        raise ValueError(
            f"{source} looks like a run folder's config.json: its {cls.__name__} fields are under \"config\". To "
            "reuse them, save that object alone: python -c \"import json,sys; print(json.dumps(json.load(open("
            f"sys.argv[1]))['config']))\" {source} > cfg.json, then --config cfg.json")
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        msg = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
        raise ValueError(f"{source}: unknown {cls.__name__} field(s): {msg}")
    return values


def config_from_namespace(cls: type[T], ns: argparse.Namespace, config_file: str | Path | None = None) -> T:
    """Build ``cls`` from defaults, an optional config file, then the flags present in ``ns``."""
    return cls(**config_values(cls, ns, config_file))


def config_values(cls: type, ns: argparse.Namespace, config_file: str | Path | None = None) -> dict[str, Any]:
    """The field values an optional config file, then the flags present in ``ns``, give ``cls``, not yet
    checked (a sweep's shared values need not be a whole config: each member completes them)."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_known_fields(cls, load_config_file(config_file), str(config_file)))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return values


def config_to_json(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists, paths strings)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
