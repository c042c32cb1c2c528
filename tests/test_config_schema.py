"""`bascule schema`: the JSON Schema generated from the config models accepts every
config Bascule ships, flags typos where `bascule check` would, carries descriptions
and defaults, and the copy in config/ (which the TOML files point their editors at)
is current."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.config.schema import config_schema, schema_text

CONFIG = Path(__file__).resolve().parent.parent / "config"
FILES = sorted([CONFIG / "bascule.toml", *(CONFIG / "examples").glob("*.toml")])


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = config_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_shipped_config_validates(validator: jsonschema.Draft7Validator,
                                        path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#:schema "), "editors find the schema through this line"
    assert errors(validator, tomllib.loads(text)) == []


def test_a_typo_is_flagged_with_its_place(validator: jsonschema.Draft7Validator) -> None:
    document = tomllib.loads((CONFIG / "bascule.toml").read_text())
    document["server"]["listen_on"] = ["127.0.0.1:8080"]
    upstream = next(iter(document["upstreams"].values()))
    upstream["stratgy"] = "round_robin"
    document["cache"] = {"stroe": "memory"}
    found = errors(validator, document)
    assert any(e.startswith("server:") and "'listen_on'" in e for e in found), found
    assert any("'stratgy'" in e for e in found), found
    assert any(e.startswith("cache:") and "stroe" in e for e in found), found


def test_values_are_checked_as_the_file_writes_them(
        validator: jsonschema.Draft7Validator) -> None:
    base = tomllib.loads((CONFIG / "bascule.toml").read_text())
    assert errors(validator, {**base, "server": {"graceful_timeout": "30s",
                                                  "max_body_size": "10MiB"}}) == []
    assert errors(validator, {**base, "server": {"max_body_size": 1024}}) == []
    assert errors(validator, {**base, "server": {"graceful_timeout": 30}})  # needs a unit
    assert errors(validator, {**base, "server": {"graceful_timeout": "30 sec"}})


def test_descriptions_and_defaults_come_from_the_models() -> None:
    schema = config_schema()
    server = schema["$defs"]["ServerConfig"]["properties"]
    assert server["listen"]["default"] == ["127.0.0.1:8080"]  # a default factory
    assert server["graceful_timeout"]["default"] == "30s"  # as written in TOML
    assert "idle longest" in server["max_connections"]["description"]  # its comment
    assert schema["$defs"]["HealthConfig"]["description"].startswith("`upstreams.<name>.health`")


def test_the_copy_in_config_is_current_and_the_command_prints_it() -> None:
    assert (CONFIG / "bascule.schema.json").read_text() == schema_text(), (
        "regenerate it: bascule schema -o config/bascule.schema.json")
    printed = subprocess.run([sys.executable, "-m", "proxy", "schema"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert printed == schema_text()
