"""Who may connect and what each may do: the ``--auth`` TOML file of tokens, and per-token publish rate limits.

A token is a secret a client presents in its handshake. The file names each token and lists the queue-name glob
patterns it may publish to and consume from, and whether it may administer queues::

    [tokens.orders-service]
    secret_sha256 = "9f86d08..."       # or: secret = "..." (at least 16 characters)
    publish = ["orders", "orders.*"]
    consume = ["billing.*"]
    admin = false
    publish_rate = 500                 # messages per second; optional
    publish_burst = 1000               # optional

Nothing here touches a socket: the server asks :meth:`AuthTable.authenticate` at the handshake and then the
returned :class:`Principal` for each request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replika_server.config import ConfigError

__all__ = ["AuthTable", "Principal", "RateLimit", "TokenBucket", "anonymous", "default_limit", "load_auth"]

#: Shortest plain ``secret`` accepted: a guessable token is a default password by another name.
MIN_SECRET_LENGTH = 16
#: Queue names a principal remembers its permission for before starting over (bounds the memo's memory).
_MEMO_LIMIT = 4096
_TOKEN_KEYS = frozenset({"secret", "secret_sha256", "publish", "consume", "admin", "publish_rate", "publish_burst"})


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's shape: ``rate`` messages per second, bursts of up to ``burst``."""

    rate: float
    burst: float


def default_limit(rate: float, burst: float) -> RateLimit | None:
    """The limit of tokens that set none (``--publish-rate``/``--publish-burst``); None when ``rate`` is 0.
    The burst defaults to one second's worth."""
    if rate <= 0:
        return None
    return RateLimit(rate, float(burst or max(1.0, rate)))


class TokenBucket:
    """Publish admission for one token, shared by all its connections.

    A publish of ``n`` messages is admitted when the bucket holds ``min(n, burst)``; it then takes all ``n``,
    possibly going below zero, so that a batch larger than the burst is admitted once the bucket is full and
    paid for afterwards. The long-run rate is ``rate`` either way.
    """

    __slots__ = ("_level", "_stamp", "limit")

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._level = limit.burst
        self._stamp = time.monotonic()

    def take(self, n: int, now: float | None = None) -> float:
        """0.0 if ``n`` messages may go now (and takes them), else the seconds to wait before asking again."""
        now = time.monotonic() if now is None else now
        rate, burst = self.limit.rate, self.limit.burst
        self._level = min(burst, self._level + (now - self._stamp) * rate)
        self._stamp = now
        need = min(float(n), burst)
        if self._level >= need - 1e-9:  # refills are floats: 50 ms at 100/s must make exactly 5
            self._level -= n
            return 0.0
        return (need - self._level) / rate


class Principal:
    """What one token (or, without ``--auth``, everybody) may do. Answers are memoised per queue name."""

    __slots__ = (
        "_consume_memo",
        "_publish_memo",
        "admin",
        "bucket",
        "consume",
        "digest",
        "everything",
        "name",
        "publish",
    )

    def __init__(
        self,
        name: str,
        digest: bytes,
        publish: tuple[str, ...],
        consume: tuple[str, ...],
        admin: bool,
        bucket: TokenBucket | None,
    ) -> None:
        self.name = name
        self.digest = digest  # SHA-256 of the secret
        self.publish = publish
        self.consume = consume
        self.admin = admin
        self.bucket = bucket
        # The common case of a trusted client skips every check.
        self.everything = admin and publish == ("*",) and consume == ("*",)
        self._publish_memo: dict[str, bool] = {}
        self._consume_memo: dict[str, bool] = {}

    def may_publish(self, queue: str) -> bool:
        return self.everything or _match(self._publish_memo, self.publish, queue)

    def may_consume(self, queue: str) -> bool:
        return self.everything or _match(self._consume_memo, self.consume, queue)

    def may_see(self, queue: str) -> bool:
        """Stats and listing: admins see every queue, others the queues they may publish to or consume from."""
        return self.admin or self.may_publish(queue) or self.may_consume(queue)


def _match(memo: dict[str, bool], patterns: tuple[str, ...], queue: str) -> bool:
    hit = memo.get(queue)
    if hit is None:
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        hit = memo[queue] = any(fnmatch.fnmatchcase(queue, p) for p in patterns)
    return hit


def anonymous(rate: RateLimit | None) -> Principal:
    """Everybody, when no ``--auth`` file is configured (the broker is then reachable only as its bind allows):
    every permission, and one rate bucket shared by all connections."""
    return Principal("anonymous", b"", ("*",), ("*",), True, TokenBucket(rate) if rate is not None else None)


class AuthTable:
    """The tokens of one load of the ``--auth`` file."""

    def __init__(self, principals: list[Principal]) -> None:
        self.principals = principals

    def authenticate(self, secret: object) -> Principal | None:
        """The principal whose secret is ``secret``, or None. Constant time in the secret: every token is
        compared, with :func:`hmac.compare_digest`, on the SHA-256 digests (equal lengths whatever is sent)."""
        if not isinstance(secret, str):
            return None
        digest = hashlib.sha256(secret.encode()).digest()
        found: Principal | None = None
        for p in self.principals:
            if hmac.compare_digest(p.digest, digest):
                found = p
        return found

    def successor(self, old: Principal) -> Principal | None:
        """After a reload: the principal with ``old``'s name and secret, or None if it was removed or rotated."""
        for p in self.principals:
            if p.name == old.name and hmac.compare_digest(p.digest, old.digest):
                return p
        return None


def load_auth(path: Path, default_rate: RateLimit | None, previous: AuthTable | None = None) -> AuthTable:
    """Parse and validate the ``--auth`` file. A token keeping its name keeps its rate bucket's level across a
    reload (a reload must not hand out a fresh burst)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read auth file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"auth file {path} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"tokens"}
    if unknown:
        raise ConfigError(f"auth file {path}: unknown top-level keys {sorted(unknown)} (expected [tokens.NAME])")
    tokens = doc.get("tokens", {})
    if not isinstance(tokens, dict) or not tokens:
        raise ConfigError(f"auth file {path} defines no tokens: add at least one [tokens.NAME] table")
    buckets = {p.name: p.bucket for p in previous.principals} if previous is not None else {}
    principals: list[Principal] = []
    digests: dict[bytes, str] = {}
    for name, table in tokens.items():
        p = _principal(path, name, table, default_rate, buckets.get(name))
        if p.digest in digests:
            raise ConfigError(f"auth file {path}: tokens {digests[p.digest]!r} and {name!r} have the same secret")
        digests[p.digest] = name
        principals.append(p)
    return AuthTable(principals)


def _principal(
    path: Path, name: str, table: Any, default_rate: RateLimit | None, old_bucket: TokenBucket | None
) -> Principal:
    where = f"auth file {path}, [tokens.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - _TOKEN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    secret, hashed = table.get("secret"), table.get("secret_sha256")
    if (secret is None) == (hashed is None):
        raise ConfigError(f"{where}: give exactly one of 'secret' and 'secret_sha256'")
    if secret is not None:
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(f"{where}: 'secret' must be a string of at least {MIN_SECRET_LENGTH} characters")
        digest = hashlib.sha256(secret.encode()).digest()
    else:
        try:
            digest = bytes.fromhex(hashed) if isinstance(hashed, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where}: 'secret_sha256' must be 64 hex digits (sha256sum of the secret)")
    patterns = {key: _patterns(where, key, table.get(key, [])) for key in ("publish", "consume")}
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{where}: 'admin' must be true or false")
    rate = default_rate
    if "publish_rate" in table or "publish_burst" in table:
        value, burst = table.get("publish_rate"), table.get("publish_burst")
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: 'publish_rate' must be a number of messages per second (0: unlimited)")
        if burst is not None and not _positive(burst):
            raise ConfigError(f"{where}: 'publish_burst' must be a positive number of messages")
        rate = default_limit(float(value), burst or 0)  # 0: unlimited, even when the server sets a default
    bucket: TokenBucket | None = None
    if rate is not None:
        if old_bucket is not None:
            old_bucket.limit = rate
            bucket = old_bucket
        else:
            bucket = TokenBucket(rate)
    return Principal(name, digest, patterns["publish"], patterns["consume"], admin, bucket)


def _patterns(where: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{where}: {key!r} must be a list of queue-name patterns (globs such as 'orders.*')")
    return tuple(value)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
