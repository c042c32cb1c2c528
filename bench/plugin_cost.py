"""CPU cost of one plugin call, in-process, without sockets: each plugin wraps a
`call_next` that answers at once, and the time per call is compared with a plugin
that only calls on (the chain's own cost is outside this measure). Complements the
wrk rows of `make bench`, which are noisier on a shared machine.

    python bench/plugin_cost.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bcrypt
from multidict import CIMultiDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.basic_auth import BasicAuth  # noqa: E402
from plugins.headers import Headers  # noqa: E402
from plugins.ip_filter import IpFilter  # noqa: E402
from plugins.rate_limit.plugin import RateLimit  # noqa: E402
from proxy.plugin import ProxyRequest, ProxyResponse  # noqa: E402


class PassThrough:
    async def __call__(self, request: ProxyRequest, call_next: Any) -> ProxyResponse:
        return await call_next(request)  # type: ignore[no-any-return]


async def answer(request: ProxyRequest) -> ProxyResponse:
    return ProxyResponse(200, CIMultiDict(), b"ok")


async def per_call(plugin: Any, calls: int, headers: dict[str, str]) -> float:
    request = ProxyRequest("GET", "/", CIMultiDict(headers), "198.51.100.7", "r", "u")
    for _ in range(1000):  # warm up (caches, the first bcrypt check)
        request.headers = CIMultiDict(headers)
        await plugin(request, answer)
    started = time.perf_counter()
    for _ in range(calls):
        request.headers = CIMultiDict(headers)
        await plugin(request, answer)
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    users = Path(tempfile.mkdtemp()) / "users"
    users.write_text(f"bench:{bcrypt.hashpw(b'bench', bcrypt.gensalt(4)).decode()}\n")
    auth = {"Authorization": "Basic " + base64.b64encode(b"bench:bench").decode()}
    cases = [
        ("pass-through", PassThrough(), {}),
        ("ip_filter", IpFilter({"allow": ["198.51.100.0/24", "2001:db8::/32"],
                                "deny": ["198.51.100.66/32"]}), {}),
        ("basic_auth", BasicAuth({"htpasswd": str(users)}), auth),
        ("rate_limit (memory)", RateLimit({"limit": 100_000_000, "burst": 100_000}), {}),
        ("headers (2 rules + security)", Headers({
            "request_set": {"X-Client": "${client}"}, "response_remove": ["Server"],
            "security": True}), {}),
    ]
    base = None
    print("| plugin | µs per call | µs over pass-through |")
    print("|---|---:|---:|")
    for name, plugin, headers in cases:
        micro = min([await per_call(plugin, args.calls, headers) for _ in range(3)])
        base = micro if base is None else base
        print(f"| {name} | {micro:.2f} | {micro - base:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
