"""Choosing a content coding from Accept-Encoding (RFC 9110 §12.5.3), pure.

Each member is a coding with an optional weight `q` (default 1; q=0 means "not
acceptable"). `*` stands for every coding not named. Of the codings the server
offers, the one with the highest weight wins; equal weights go to the server's order
of preference (zstd, br, gzip by default: best ratio per CPU first). No coding
with a weight above 0: None (identity). A request without Accept-Encoding gets no
coding: RFC 9110 would allow any, but clients that understand none send none (what
nginx and Envoy do too). Malformed members are ignored; an unparsable q counts as 0.
"""

from __future__ import annotations

__all__ = ["accepted", "negotiate"]


def accepted(header: str) -> dict[str, float]:
    """coding -> weight, lower-cased; later duplicates do not override earlier ones."""
    weights: dict[str, float] = {}
    for member in header.split(","):
        coding, _, params = member.strip().partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        weights.setdefault(coding, q)
    return weights


def negotiate(header: str | None, offered: tuple[str, ...]) -> str | None:
    if header is None:
        return None
    weights = accepted(header)
    star = weights.get("*")
    best, best_q = None, 0.0
    for coding in offered:
        q = weights.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best
