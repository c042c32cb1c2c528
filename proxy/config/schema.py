"""`bascule schema`: a JSON Schema of the config file, generated from the pydantic
models that validate it, so it cannot drift from what `bascule check` accepts.

Editors use it to complete keys and flag typos as you type (Taplo / Even Better
TOML: a `#:schema ./bascule.schema.json` line at the top of the file). Descriptions
come from the models' docstrings and from the comments beside their fields (the
comments the code already carries are the documentation); defaults from the fields,
factories included, written as the config writes them ("30s", not 30.0).

What the schema cannot know: plugin options (each plugin validates its own; the
`[cache]` table's keys are listed), cross-table rules (a route naming an upstream
that exists) and files that must exist. `bascule check` still has the last word.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import textwrap
import tokenize
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticUndefined, core_schema

from proxy.config.load import CACHE_TABLE_PLUGIN
from proxy.config.model import Config
from proxy.config.types import DURATION_PATTERN, duration_text
from proxy.loader import load
from proxy.plugin import DeclaresOptions

__all__ = ["SCHEMA_ID", "config_schema", "field_comments"]

SCHEMA_ID = "https://bascule.invalid/schema/config.json"
_FIELD = re.compile(r"^    ([a-z_][a-z0-9_]*)\s*:")


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comments on the lines just above it and at its line's end."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    standalone: dict[int, str] = {}
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            text = token.string.lstrip("#").strip()
            if lines[row - 1][:column].strip():
                trailing[row] = text
            else:
                standalone[row] = text
    comments: dict[str, str] = {}
    for row, line in enumerate(lines, start=1):
        match = _FIELD.match(line)
        if match is None:
            continue
        above: list[str] = []
        previous = row - 1
        while previous in standalone:
            above.insert(0, standalone[previous])
            previous -= 1
        parts = [*above, *([trailing[row]] if row in trailing else [])]
        if parts:
            comments[match.group(1)] = " ".join(parts)
    return comments


class _ConfigSchema(GenerateJsonSchema):
    """Pydantic's generator plus: field comments as descriptions, and defaults made
    by factories shown too (pydantic leaves them out)."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            schema = {**schema, "default": factory()}  # type: ignore[call-arg]
            schema.pop("default_factory", None)
        json_schema = super().default_schema(schema)
        default = json_schema.get("default")
        if isinstance(default, float) and _is_duration(json_schema):
            json_schema["default"] = duration_text(default)  # as the file writes it
        return json_schema

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        comments = field_comments(schema["cls"])
        target = json_schema
        if "$ref" in json_schema:
            target = self.definitions.get(json_schema["$ref"].split("/")[-1], json_schema)
        for name, prop in target.get("properties", {}).items():
            text = comments.get(name)
            if text and "description" not in prop:
                prop["description"] = text
        return json_schema

    def encode_default(self, dft: Any) -> Any:
        if dft is PydanticUndefined:
            return dft
        return super().encode_default(dft)


def _is_duration(json_schema: JsonSchemaValue) -> bool:
    options = json_schema.get("anyOf", [json_schema])
    return any(o.get("pattern") == DURATION_PATTERN for o in options if isinstance(o, dict))


def _cache_options() -> list[str] | None:
    """The option names the plugin behind the `[cache]` table declares
    (`option_names`), found as the config's loading finds it."""
    try:
        factory = load("bascule.plugins", CACHE_TABLE_PLUGIN)
    except ValueError:
        return None
    names = factory.option_names if isinstance(factory, DeclaresOptions) else None
    return sorted(names) if names else None


def config_schema() -> dict[str, Any]:
    schema = TypeAdapter(Config).json_schema(mode="validation",
                                             schema_generator=_ConfigSchema)
    # Draft 7: what Taplo (Even Better TOML) validates with. The $defs pointers
    # resolve as plain JSON pointers in any draft.
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "Bascule configuration"
    schema["description"] = ("The TOML file `bascule run -c` reads. Generated by "
                             "`bascule schema` from the models that validate it.")
    cache = schema["properties"]["cache"]
    names = _cache_options()
    if names:
        cache["propertyNames"] = {"enum": names}
    cache["description"] = ("The response cache's options; routes turn it on with "
                            "`cache = true` (the cache plugin validates the values).")
    return schema


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"
