"""The `bascule` command: run, check, schema, demo, --version."""

from __future__ import annotations

import argparse
import logging
import sys

from proxy import __version__
from proxy.app import build_runtime
from proxy.config import load_config
from proxy.errors import ConfigError

__all__ = ["main"]

DEFAULT_CONFIG = "config/bascule.toml"


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )


def _require_c_parser() -> bool:
    from proxy.edge_protocol import c_parser_in_use

    if not c_parser_in_use():
        print("bascule: refusing to start: aiohttp's C HTTP parser is not in use "
              "(is AIOHTTP_NO_EXTENSIONS set, or was aiohttp built without extensions?). "
              "The pure-Python parser has had request-smuggling bugs.", file=sys.stderr)
        return False
    return True


def cmd_check(files: list[str]) -> int:
    failed = False
    for file in files:
        try:
            build_runtime(load_config(file), file)
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:
                print(problem)
        else:
            print(f"ok: {file}")
    return 2 if failed else 0


def cmd_run(file: str) -> int:
    _setup_logging()
    try:
        config = load_config(file)
        build_runtime(config, file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if not _require_c_parser():
        return 1
    from proxy.workers import run_supervisor

    return run_supervisor(config, file)


def cmd_schema(output: str | None) -> int:
    from proxy.config.schema import schema_text

    text = schema_text()
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo() -> int:
    _setup_logging()
    if not _require_c_parser():
        return 1
    from proxy.demo import run_demo

    return run_demo()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bascule", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bascule {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="default: %(default)s")
    check = sub.add_parser("check", help="validate config files")
    check.add_argument("files", nargs="+")
    schema = sub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    schema.add_argument("-o", "--output", help="write it to this file instead")
    sub.add_parser("demo", help="three demo backends and Bascule in front of them")
    args = parser.parse_args(argv)
    if args.command == "check":
        return cmd_check(args.files)
    if args.command == "run":
        return cmd_run(args.config)
    if args.command == "schema":
        return cmd_schema(args.output)
    return cmd_demo()
