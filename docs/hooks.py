"""MkDocs hook: the config and CLI reference pages, generated from the code at every build.

``<!-- config-reference -->`` becomes a table of every key of :class:`mace_ood.config.RunConfig`
(nested models as dotted keys, ``model_families.<name>.head``) with its type, default and
description; ``<!-- cli-reference -->`` becomes every ``mace-ood`` command with its options, from
the typer app. A field renamed in ``config.py`` changes the page; one without a description fails
the build (``tests/test_docs.py`` checks the same without MkDocs).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

CONFIG_MARKER = "<!-- config-reference -->"
CLI_MARKER = "<!-- cli-reference -->"


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a!r}`".replace("'", '"') for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(below)"
    if value is None:
        return "none"
    return f"`{value!r}`".replace("'", '"') if not isinstance(value, bool) else f"`{str(value).lower()}`"


def _models_inside(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_inside(a)]


def config_rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key a config file may hold."""
    if model is None:
        from mace_ood.config import RunConfig

        model = RunConfig
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _models_inside(field.annotation)
        doc = (inner[0].__doc__ or "").strip().split("\n\n")[0] if inner else ""
        description = (field.description or doc).replace("\n", " ")
        if not description:
            raise ValueError(f"config key {key!r} has no description: give its Field one (mace_ood/config.py)")
        rows.append((key, _type_name(field.annotation), _default(field), description.replace("|", "\\|")))
        for sub in inner:
            container = get_origin(field.annotation)
            if container is dict:
                rows.extend(config_rows(sub, f"{key}.<name>."))
            elif container in (typing.Union, types.UnionType) and any(get_origin(a) is list for a in get_args(field.annotation)) \
                    or container is list:
                rows.extend(config_rows(sub, f"{key}[]."))
            else:
                rows.extend(config_rows(sub, f"{key}."))
    return rows


def config_reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {default} | {text} |" for key, kind, default, text in config_rows()]
    return "\n".join(lines)


def cli_reference() -> str:
    import click
    import typer

    from mace_ood.cli import app

    group = typer.main.get_command(app)
    context = click.Context(group, info_name="mace-ood")
    parts = []
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        parts.append(f"### `mace-ood {name}`\n")
        parts.append((command.help or "").strip().replace("\n", " ") + "\n")
        parts.append("| option | type | default | meaning |\n|---|---|---|---|")
        for parameter in command.params:
            if parameter.name == "help":
                continue
            if "Argument" in type(parameter).__name__:
                names = f"`{parameter.name.upper()}` (argument)"
            else:
                names = ", ".join(f"`{o}`" for o in [*parameter.opts, *parameter.secondary_opts])
            descriptor = getattr(parameter, "type_descriptor", None)
            kind = _type_name(descriptor.annotation) if descriptor is not None else parameter.type.name
            default = parameter.default
            shown = "required" if parameter.required else ("none" if default in (None, ()) else f"`{default}`")
            help_text = (getattr(parameter, "help", None) or "").replace("\n", " ").replace("|", "\\|")
            parts.append(f"| {names} | {kind} | {shown} | {help_text} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' hook signature
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown
