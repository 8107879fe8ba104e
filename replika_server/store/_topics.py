"""Topic bindings: which queues a ``publish_topic`` reaches.

A topic is a name of dot-separated words (``orders.eu.created``). A binding pattern is the same with two
wildcards, each a whole word: ``*`` matches exactly one word, ``#`` zero or more (``orders.#`` matches ``orders``
and ``orders.eu.created``; ``*.created`` matches ``orders.created`` only). The semantics are AMQP's topic exchange.
"""

from __future__ import annotations

__all__ = ["MAX_PATTERN", "Bindings", "topic_matches"]

#: Longest pattern, in characters: a queue name's limit, so that any queue name is also a valid pattern.
MAX_PATTERN = 255
#: Topics whose matching queues are remembered; cleared whole when full (publishers use few distinct topics).
_CACHE_SIZE = 10_000


def topic_matches(pattern: tuple[str, ...], topic: list[str]) -> bool:
    """Whether the words of ``pattern`` match the words of ``topic``. Linear in their product, no backtracking:
    ``matched[j]`` is whether the pattern words seen so far match the first ``j`` topic words."""
    n = len(topic)
    matched = [True] + [False] * n
    for word in pattern:
        if word == "#":
            seen = False
            for j in range(n + 1):
                seen = seen or matched[j]
                matched[j] = seen
        else:
            for j in range(n, 0, -1):
                matched[j] = matched[j - 1] and (word == "*" or topic[j - 1] == word)
            matched[0] = False
    return matched[n]


class Bindings:
    """Every binding of every queue, and a cache of which queues each recent topic reaches."""

    __slots__ = ("_cache", "_patterns")

    def __init__(self) -> None:
        self._patterns: dict[str, tuple[tuple[str, ...], set[str]]] = {}  # pattern -> (its words, queues)
        self._cache: dict[str, list[str]] = {}

    def add(self, queue: str, pattern: str) -> None:
        entry = self._patterns.get(pattern)
        if entry is None:
            entry = self._patterns[pattern] = (tuple(pattern.split(".")), set())
        entry[1].add(queue)
        self._cache.clear()

    def remove(self, queue: str, pattern: str) -> None:
        entry = self._patterns.get(pattern)
        if entry is not None:
            entry[1].discard(queue)
            if not entry[1]:
                del self._patterns[pattern]
        self._cache.clear()

    def clear(self) -> None:
        self._patterns.clear()
        self._cache.clear()

    def match(self, topic: str) -> list[str]:
        """The queues bound by a pattern matching ``topic``, each once, sorted by name."""
        queues = self._cache.get(topic)
        if queues is None:
            words = topic.split(".")
            found: set[str] = set()
            for pattern, bound in self._patterns.values():
                if topic_matches(pattern, words):
                    found |= bound
            queues = sorted(found)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = queues
        return queues
