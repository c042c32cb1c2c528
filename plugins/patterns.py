"""Regular expressions for the `rewrite` and `redirect` plugins, and the replacement
templates that use their groups.

The engine is RE2 (`google-re2`, Google's own binding): matching time is linear in
the input, whatever the pattern, so no request path can make the loop spend seconds
backtracking through `^(a+)+$` (Python's `re` would). RE2 refuses what it cannot do
in linear time (backreferences, look-around): such a pattern is a config error at
load, naming the option. Patterns are compiled once, when the runtime is built.

Templates: `$1` … `$9` and `${name}` insert a group (empty when it did not take
part); `$$` is a dollar sign; everything else is literal. A template's literal text
may not contain whitespace or control characters (it becomes part of a request line
or a Location field).
"""

from __future__ import annotations

import re
from typing import Any

import re2  # type: ignore[import-untyped]

__all__ = ["Template", "compile_pattern", "compile_template"]

_REFERENCE = re.compile(r"\$(\$|\d|\{([A-Za-z_][A-Za-z0-9_]*|\d+)\})")
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def compile_pattern(option: str, pattern: Any) -> Any:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{option}: must be a regular expression")
    options = re2.Options()
    options.log_errors = False  # the error is ours to report, with its option
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) \
            else str(exc)
        raise ValueError(f"{option}: {pattern!r} is not a pattern RE2 accepts ({reason}); "
                         "backreferences and look-around are not linear-time") from None


class Template:
    """A replacement: literal parts and group references, checked at load."""

    def __init__(self, option: str, text: Any, pattern: Any) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError(f"{option}: must be a non-empty string")
        self.parts: list[str | int] = []
        groups = pattern.groups
        names = pattern.groupindex
        at = 0
        for match in _REFERENCE.finditer(text):
            self._literal(option, text[at:match.start()])
            token = match.group(1)
            if token == "$":
                self.parts.append("$")
            else:
                ref = match.group(2) or token
                if ref.isdigit():
                    index = int(ref)
                    if index > groups:
                        raise ValueError(f"{option}: ${ref} but the pattern has only "
                                         f"{groups} group(s)")
                else:
                    if ref not in names:
                        raise ValueError(f"{option}: no group named {ref!r} in the pattern")
                    index = names[ref]
                self.parts.append(index)
            at = match.end()
        self._literal(option, text[at:])

    def _literal(self, option: str, text: str) -> None:
        if text:
            if _UNSAFE.search(text):
                raise ValueError(f"{option}: whitespace or control characters in "
                                 f"{text!r}")
            self.parts.append(text)

    def expand(self, match: Any) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, int):
                out.append(match.group(part) or "")
            else:
                out.append(part)
        return "".join(out)


def compile_template(option: str, text: Any, pattern: Any) -> Template:
    return Template(option, text, pattern)
