"""Dagster run config built from a stage's own config dataclass, so that each knob is declared once.

`config_from(MiningConfig, ("m", "dup_threshold", "rank_min"), ...)` makes a `dg.Config` whose fields are those of
the dataclass, with its defaults and its field docstrings as the launchpad's descriptions; `to(cls, config,
**fixed)` builds the dataclass back (its `__post_init__` checks apply). A changed default or docstring in
`pipeline.mine.MiningConfig`, `sae.SaeConfig` or `sae.TrainConfig` is therefore the UI's too."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

import dagster as dg
import pydantic


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the house style), read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _config_type(tp: Any) -> Any:
    """Literal choices become `str` (validated by the dataclass), the rest stays as declared."""
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp


def config_from(cls: type, names: tuple[str, ...], name: str, doc: str,
                extra: dict[str, tuple[Any, Any, str]] | None = None,
                defaults: dict[str, Any] | None = None) -> type[dg.Config]:
    """A `dg.Config` subclass named `name` with the fields `names` of dataclass `cls` (type, default, docstring),
    plus `extra` fields {name: (type, default, description)} that belong to the asset, not the stage. `defaults`
    overrides a dataclass default where the asset's differs."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{cls.__name__} has no field(s) {missing}")
    fields: dict[str, Any] = {}
    for n in names:
        f = by_name[n]
        default = (defaults or {}).get(n, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        fields[n] = (_config_type(hints[n]), pydantic.Field(default=default, description=docs.get(n)))
    for n, (tp, default, description) in (extra or {}).items():
        fields[n] = (tp, pydantic.Field(default=default, description=description))
    model = pydantic.create_model(name, __base__=dg.Config, __module__=cls.__module__, **fields)
    model.__doc__ = doc
    return model


def to(cls: type, config: dg.Config, **fixed: Any):
    """The dataclass `cls` from the config's fields it declares, plus `fixed` values (e.g. from the partition)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.model_dump().items() if k in names}, **fixed)
