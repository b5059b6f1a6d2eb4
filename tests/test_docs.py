"""The documentation: the generated reference pages cannot drift from the code, the README stays short."""

import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from mace_ood.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key of ``model``, walked independently of the hook (pydantic's JSON schema)."""
    schema = model.model_json_schema()
    definitions = schema.get("$defs", {})
    keys: set[str] = set()

    def walk(node: dict, path: str) -> None:
        if "$ref" in node:
            node = definitions[node["$ref"].split("/")[-1]]
        for option in node.get("anyOf", []):
            walk(option, path)
        if node.get("type") == "array" and "items" in node:
            walk(node["items"], f"{path}[]")
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.<name>")
        for name, child in node.get("properties", {}).items():
            key = f"{path}.{name}" if path else name
            keys.add(key)
            walk(child, key)

    walk(schema, prefix)
    return keys


def test_every_config_key_is_on_the_generated_reference_page_with_its_default(hooks):
    page = hooks.config_reference()
    documented = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    assert documented == leaf_keys(RunConfig)
    rows = {key: (kind, default) for key, kind, default, _ in hooks.config_rows()}
    assert rows["select.top_k"][1] == "`30`"
    assert rows["output_dir"][1] == "required"
    assert rows["scores.gmm_components"][1] == "`[1, 2, 4, 8]`"


def test_a_renamed_or_undescribed_field_changes_the_page_or_fails_it(hooks):
    from pydantic import Field, create_model

    renamed = create_model("Renamed", top_k_renamed=(int, Field(30, description="Structures.")))
    assert [row[0] for row in hooks.config_rows(renamed)] == ["top_k_renamed"]
    undescribed = create_model("Undescribed", top_k=(int, 30))
    with pytest.raises(ValueError, match="'top_k' has no description"):
        hooks.config_rows(undescribed)


def test_every_cli_command_and_option_is_on_the_generated_page(hooks):
    import click
    import typer

    from mace_ood.cli import app

    page = hooks.cli_reference()
    group = typer.main.get_command(app)
    context = click.Context(group)
    for name in group.list_commands(context):
        assert f"### `mace-ood {name}`" in page
        for parameter in group.get_command(context, name).params:
            if parameter.name != "help" and parameter.opts:
                assert f"`{parameter.opts[0]}`" in page or f"`{parameter.name.upper()}`" in page, (name, parameter.name)


def test_the_readme_is_short_and_user_facing():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for banned in (r"this box", r"\bround\b", r"\b20\d\d-\d\d-\d\d\b"):  # no history, no dated timing
        assert not re.search(banned, readme, flags=re.I), banned
    for link in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", readme):
        assert (ROOT / link).exists(), link
