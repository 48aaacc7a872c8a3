"""Loading a run config: YAML (duplicate keys refused), `--set` overrides, one-line errors with did-you-mean,
and `s3ray config --explain`."""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from s3ray.config.schema import ConfigError, S3Config


def _did_you_mean(loc: tuple) -> str:
    """For an unknown field: the closest real field of the same section, if one is close."""
    model: Any = S3Config
    for part in loc[:-1]:
        f = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = f.annotation if f is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    """One line: `invalid config SOURCE: a.b: problem; c: problem` (the CLI prints errors as one line)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `s3ray config --explain` lists every field)"
            msg += _did_you_mean(e["loc"])
        elif e["type"] == "missing":
            msg = "required field is missing"
            if e["loc"] == ("data",):
                msg += " (add data: {validation: path/to/validation.jsonl})"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return f"invalid config {source}: " + "; ".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings from the command line; values are parsed as YAML scalars."""
    out = []
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r}: expected section.field=value, e.g. synthesis.rounds=1")
        k, v = p.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError:
            raise ConfigError(f"override {p!r}: the value is not a YAML scalar or list; quote it") from None
    return out


def config_from_dict(raw: dict, source: str = "(dict)", overrides: list[str] | None = None) -> S3Config:
    raw = dict(raw or {})
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v)
    try:
        return S3Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> S3Config:
    """Load and validate a YAML run config. Relative data paths resolve against the current directory.

    `base: OTHER.yaml` (relative to this file) starts from another config: this file's sections are merged
    over it field by field, so a variant states only what it changes.
    """
    path = Path(path)
    return config_from_dict(_with_base(_read_yaml(path), path, {path.resolve()}), str(path), overrides)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (examples live in configs/)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config {path} is not valid YAML{where}: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections (run, data, teacher, ...)")
    return raw


def _with_base(raw: dict, path: Path, seen: set[Path]) -> dict:
    """`raw` merged over the config its `base:` names (recursively)."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config {path}: base: the path of another config, relative to this file "
                          f"(e.g. base: sst2_quickstart.yaml), got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in seen:
        raise ConfigError(f"config {path}: base: {base} leads back to a config already on the chain; remove the loop")
    if not base_path.is_file():
        raise ConfigError(f"config {path}: base: {base_path} not found (relative to the folder of {path.name})")
    return _merged(_with_base(_read_yaml(base_path), base_path, seen | {base_path.resolve()}), raw)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _type_name(ann: Any) -> str:
    """`int | Literal['auto']`, `str | None`, `list[str]`: a field's type as a person writes it."""
    if ann is type(None):
        return "None"
    if isinstance(ann, type):
        return ann.__name__
    if get_origin(ann) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    return str(ann).replace("typing.", "")


def explain(model: type[BaseModel] = S3Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default, description."""
    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        dotted = f"{prefix}{name}"
        if sub is not None:
            lines.append(f"{dotted}:  {f.description or sub.__doc__ or ''}".rstrip())
            lines.extend(explain(sub, dotted + "."))
        else:
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            tname = _type_name(ann)
            lines.append(f"  {dotted} ({tname}, default {default}): {f.description or ''}")
    return lines
