"""AMQP names on Replika: queue names, and exchanges with routing keys as topics and binding patterns.

Replika names are 1-255 characters of ``[A-Za-z0-9._:-]``. A queue name that is already valid is used as it is;
any other character is written ``:XX`` per UTF-8 byte (``celery@host.celery.pidbox`` becomes
``celery:40host.celery.pidbox``).

An exchange ``X`` and a routing key ``R`` become the topic ``<X>.<R>``: ``X`` as one word (its dots and colons
escaped too, so exchange ``a`` can never match exchange ``a.b``) and ``R`` word for word, since AMQP's topic
matching (``*`` one word, ``#`` zero or more) is Replika's. Bindings become patterns by exchange type:
fanout ``<X>.#``, direct ``<X>.<key>`` (every character literal), topic ``<X>.<key>`` (whole-word ``*`` and ``#``
kept as wildcards).
"""

from __future__ import annotations

import re

__all__ = ["binding_pattern", "queue_name", "topic"]

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
# In a topic word ':' is the escape character itself, so it is escaped too (one topic word never looks like
# another); '.' separates words.
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_NAME = 255


def _escape(text: str, keep: frozenset[str]) -> str:
    return "".join(c if c in keep else "".join(f":{b:02x}" for b in c.encode()) for c in text)


def _checked(name: str, what: str, original: str) -> str:
    if not 1 <= len(name) <= MAX_NAME:
        raise ValueError(
            f"replika: {what} for {original!r} is {len(name)} characters once escaped; Replika allows 1-{MAX_NAME}"
        )
    return name


def queue_name(name: str) -> str:
    """The Replika queue for the kombu queue ``name``."""
    if _VALID.fullmatch(name):
        return name
    return _checked(_escape(name, _NAME_CHARS), "the queue name", name)


def _exchange_word(exchange: str) -> str:
    return _escape(exchange, _WORD_CHARS)


def topic(exchange: str, routing_key: str) -> str:
    """The topic a message published to ``exchange`` with ``routing_key`` is published under."""
    words = [_escape(w, _WORD_CHARS) for w in routing_key.split(".")]
    return _checked(".".join([_exchange_word(exchange), *words]), "the topic", f"{exchange}/{routing_key}")


def binding_pattern(exchange: str, exchange_type: str, routing_key: str) -> str:
    """The Replika binding pattern for binding a queue to ``exchange`` with ``routing_key``."""
    head = _exchange_word(exchange)
    if exchange_type == "fanout":
        return _checked(f"{head}.#", "the binding", exchange)
    wildcards = ("*", "#") if exchange_type == "topic" else ()
    words = [w if w in wildcards else _escape(w, _WORD_CHARS) for w in routing_key.split(".")]
    return _checked(".".join([head, *words]), "the binding", f"{exchange}/{routing_key}")
