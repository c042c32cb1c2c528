"""`basic_auth`: HTTP Basic authentication (RFC 7617) against an htpasswd file.

- Entries are bcrypt (`$2y$`, `$2b$`, `$2a$`: `htpasswd -B`). Weaker ones are a
  config error naming the line, unless `allow_weak_hashes = true`, which accepts
  `{SHA}` (`htpasswd -s`, unsalted SHA-1). MD5 (`$apr1$`), crypt and plain text are
  refused either way.
- bcrypt is slow by design (tens of milliseconds): a check runs in a thread (bcrypt
  releases the GIL), never on the event loop. A verified credential is remembered
  for `cache_ttl` as the SHA-256 of "user:password" (never the password itself), in a
  bounded map, so a client's next requests cost one hash. An unknown user is checked
  against a dummy hash, so timing does not tell which users exist; comparisons of
  digests are constant-time.
- A request without valid credentials gets `401` with
  `WWW-Authenticate: Basic realm="…", charset="UTF-8"`.
- `Authorization` is removed before forwarding unless `pass_authorization = true`.
  With `user_header = "X-Auth-User"` the authenticated name is forwarded there; the
  client's own value of that header is always removed first.
- The file is read when the runtime is built, so a reload reads it again; its
  content is part of the config's identity, so editing it alone is a change.

    [[plugins]]
    name = "staff"
    use = "basic_auth"
    options = { htpasswd = "/etc/bascule/staff.htpasswd", user_header = "X-Auth-User" }
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from typing import Any

import bcrypt
from multidict import CIMultiDict

from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options
from proxy.units import parse_duration

__all__ = ["BasicAuth", "parse_htpasswd"]

_OPTIONS = {"htpasswd", "realm", "allow_weak_hashes", "user_header", "pass_authorization",
            "cache_ttl"}
_BCRYPT = ("$2y$", "$2b$", "$2a$")
_CACHE_MAX = 10_000
# Checked when the user is unknown, so that the time taken does not say so.
_DUMMY = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))


def parse_htpasswd(text: str, *, allow_weak: bool, path: str) -> dict[str, bytes]:
    """user -> hash. ValueError naming the line for anything unusable."""
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ValueError(f"{path}: line {number}: not \"user:hash\"")
        if user in users:
            raise ValueError(f"{path}: line {number}: user {user!r} appears twice")
        if hashed.startswith(_BCRYPT):
            try:
                bcrypt.checkpw(b"", hashed.encode())
            except ValueError:
                raise ValueError(f"{path}: line {number}: malformed bcrypt hash") from None
        elif hashed.startswith("{SHA}"):
            if not allow_weak:
                raise ValueError(f"{path}: line {number}: {{SHA}} is a weak hash; use "
                                 "bcrypt (htpasswd -B), or set allow_weak_hashes = true")
            try:
                if len(base64.b64decode(hashed[5:], validate=True)) != 20:
                    raise binascii.Error
            except binascii.Error:
                raise ValueError(f"{path}: line {number}: malformed {{SHA}} hash") from None
        else:
            kind = "MD5 ($apr1$)" if hashed.startswith("$apr1$") else "crypt or plain text"
            raise ValueError(f"{path}: line {number}: {kind} entries are not accepted; "
                             "use bcrypt (htpasswd -B)")
        users[user] = hashed.encode()
    if not users:
        raise ValueError(f"{path}: no users")
    return users


def _check(hashed: bytes, password: bytes) -> bool:
    if hashed.startswith(b"{SHA}"):
        digest = base64.b64encode(hashlib.sha1(password).digest())
        return hmac.compare_digest(digest, hashed[5:])
    return bcrypt.checkpw(password, hashed)


class BasicAuth:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        path = options.get("htpasswd")
        if not isinstance(path, str) or not path:
            raise ValueError("htpasswd: the path of an htpasswd file is required")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"htpasswd: {path}: unreadable: {exc}") from None
        allow_weak = options.get("allow_weak_hashes", False)
        if not isinstance(allow_weak, bool):
            raise ValueError("allow_weak_hashes: must be true or false")
        try:
            self.users = parse_htpasswd(text, allow_weak=allow_weak, path=path)
        except ValueError as exc:
            raise ValueError(f"htpasswd: {exc}") from None
        self._digest = hashlib.sha256(text.encode()).hexdigest()
        realm = options.get("realm", "Bascule")
        if not isinstance(realm, str) or '"' in realm or "\\" in realm:
            raise ValueError("realm: must be a string without quotes or backslashes")
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'
        user_header = options.get("user_header")
        if user_header is not None and (not isinstance(user_header, str) or not user_header):
            raise ValueError("user_header: must be a header name")
        self.user_header: str | None = user_header
        self.pass_authorization = bool(options.get("pass_authorization", False))
        try:
            self.cache_ttl = parse_duration(options.get("cache_ttl", "5m"))
        except ValueError as exc:
            raise ValueError(f"cache_ttl: {exc}") from None
        self._verified: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def source_digest(self) -> str:
        """The htpasswd file's content, for the config's identity (a reload)."""
        return self._digest

    async def _verify(self, user: str, password: str) -> bool:
        key = hashlib.sha256(f"{user}:{password}".encode()).digest()
        now = time.monotonic()
        known = self._verified.get(key)
        if known is not None and known[1] > now:
            self._verified.move_to_end(key)
            return True
        hashed = self.users.get(user)
        ok = await asyncio.get_running_loop().run_in_executor(
            None, _check, hashed if hashed is not None else _DUMMY, password.encode())
        if not ok or hashed is None:
            return False
        self._verified[key] = (user, now + self.cache_ttl)
        if len(self._verified) > _CACHE_MAX:
            self._verified.popitem(last=False)
        return True

    def _refuse(self) -> ProxyResponse:
        body = b"authentication required\n"
        return ProxyResponse(401, CIMultiDict({
            "WWW-Authenticate": self.challenge,
            "Content-Type": "text/plain; charset=utf-8"}), body, length=len(body))

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        headers = request.headers
        if self.user_header is not None:
            headers.popall(self.user_header, None)
        credentials = _credentials(headers.get("Authorization", ""))
        if credentials is None or not await self._verify(*credentials):
            return self._refuse()
        if not self.pass_authorization:
            headers.popall("Authorization", None)
        if self.user_header is not None:
            headers[self.user_header] = credentials[0]
        return await call_next(request)


def _credentials(value: str) -> tuple[str, str] | None:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
