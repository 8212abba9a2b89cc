"""Reading a configuration: YAML text and files, ``key=value`` overrides, and a nested mapping turned into the
config dataclasses.

The YAML reader refuses duplicate keys (naming the key and both lines) and turns a missing file, text that is not
UTF-8 and YAML syntax errors into one-line errors naming the file; an override's value is read as YAML;
``from_dict`` coerces each value to its field's type and names the dotted key of an unknown key or a wrong value.
It knows no particular config: ``hbat.trainer.config.load_config`` puts these together for ``TrainConfig``, and
``hbat compare`` reads its spec with ``read_yaml_file``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from ..errors import UserError
from .checks import ConfigError


def _convert(value: Any, hint, where: str) -> Any:
    """Coerce a YAML / command-line value to the field's type; errors name the key."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, where)
    text = str(hint)
    if value is None:
        if "None" not in text:
            raise ValueError(f"{where} cannot be null")
        return None
    for kind in (bool, int, float, str):
        if hint is kind or text.startswith(kind.__name__ + " |") or text == f"{kind.__name__} | None":
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{where} must be an integer, got {value!r}")
            if kind is float:
                if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{where} must be a number, got {value!r}")
                return float(value)
            if kind is str and not isinstance(value, str):
                raise ValueError(f"{where} must be a string, got {value!r}")
            return value
    if "list" in text:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{where} must be a list of strings, got {value!r}")
        return list(items)
    return value


def from_dict(cls, data: dict, where: str = "config"):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}; valid keys of {where}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the dataclass names its field; the message names the dotted key
        raise ConfigError(f"{where}.{exc.field}", exc.problem) from None


def read_yaml(text: str, source: str):
    """``yaml.safe_load`` that refuses duplicate keys (naming the key and both lines) and turns syntax errors
    into one-line ValueErrors naming ``source``."""
    import yaml  # optional: pyyaml comes with hbat[train]

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise ValueError(f"{source}, line {line}: duplicate key {key!r} (first at line {first[key]})")
                    first[key] = line
                except TypeError:  # an unhashable key: safe_load's own error follows
                    pass
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None


def read_yaml_file(path: str):
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return read_yaml(text, path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sft.lr=3e-4"`` -> (["sft", "lr"], 3e-4); the value is parsed as YAML (numbers, true, null, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. sft.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {text!r} has an empty key")
    return key.strip().split("."), read_yaml(raw, f"override {text!r}") if raw.strip() else None


def apply_overrides(data: dict, overrides) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data
