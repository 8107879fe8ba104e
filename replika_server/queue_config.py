"""Queues declared by the config file: ``[queues."name"]`` tables, which the broker declares at every start.

A table holds the options of the wire ``declare`` (SPEC.md §5) under the same names: ``max_attempts``,
``dead_letter``, ``max_length``, ``max_bytes``, ``overflow``, ``retry_delay``, ``retry_backoff``,
``retry_max_delay``, ``message_ttl``, ``expired``, ``dedup_window`` and ``history``. Durations are seconds or a
string with a unit (``"30s"``, ``"7d"``), sizes are bytes or a string with a unit (``"64M"``), and ``history`` is
``true`` (on, with the defaults) or a table of ``retention`` (a duration), ``max_messages`` and ``payloads``.
The ranges are checked by the parser of a client's declare, so a file can declare nothing a client could not.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

from replika_protocol import is_valid_queue_name
from replika_server.requests import RequestError, declare_op
from replika_server.store import QueueOptions
from replika_server.store.model import HistoryOptions
from replika_server.units import ConfigError, parse_duration, parse_size

__all__ = ["DeclaredQueue", "queues_from_toml", "render_queues"]


@dataclass(frozen=True, slots=True)
class DeclaredQueue:
    """A queue the broker declares with ``options`` when it starts (replacing the options it had)."""

    name: str
    options: QueueOptions


#: Each option of a queue's table and the kind of value it takes.
_OPTIONS = {
    "max_attempts": "integer",
    "dead_letter": "string",
    "max_length": "integer",
    "max_bytes": "size",
    "overflow": "string",
    "retry_delay": "duration",
    "retry_backoff": "number",
    "retry_max_delay": "duration",
    "message_ttl": "duration",
    "expired": "string",
    "dedup_window": "duration",
    "history": "history",
}
_HISTORY = {"retention": "duration", "max_messages": "integer", "payloads": "boolean"}
_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "size": (int,),
    "duration": (),  # parsed above, or refused here
    "number": (int, float),
    "string": (str,),
    "boolean": (bool,),
}
#: The name the declare parser gives a field in its messages ("field 'retention' must be ...").
_FIELD = re.compile(r"field '(\w+)'(?: of 'history')?")


def queues_from_toml(value: Any) -> tuple[DeclaredQueue, ...]:
    """The queues of a config file's ``queues`` table; :class:`ConfigError` naming the key that is wrong."""
    if not isinstance(value, dict):
        raise ConfigError('queues must be tables: [queues."name"], each with the options of declare')
    return tuple(_queue(name, table) for name, table in value.items())


def _queue(name: str, table: Any) -> DeclaredQueue:
    where = f"queues.{_key(name)}"
    if not is_valid_queue_name(name):
        raise ConfigError(f"{where}: not a queue name (1-255 characters of [A-Za-z0-9._:-])")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of declare's options, e.g. max_attempts = 5")
    frame: dict[str, Any] = {"queue": name}
    for key, raw in table.items():
        frame[key] = _value(where, key, _OPTIONS, raw)
    try:
        op = declare_op(frame)
    except RequestError as exc:
        raise ConfigError(_qualified(where, exc.message)) from None
    return DeclaredQueue(op.queue, op.options)


def _value(where: str, key: str, kinds: dict[str, str], raw: Any) -> Any:
    kind = kinds.get(key)
    if kind is None:
        close = difflib.get_close_matches(key.replace("-", "_"), kinds, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown option {key!r}{hint}; the options are {', '.join(kinds)}")
    name = f"{where}.{key}"
    if kind == "history":
        if isinstance(raw, bool):
            return raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{name} must be true, false or a table of {', '.join(_HISTORY)}")
        return {k: _value(name, k, _HISTORY, v) for k, v in raw.items()}
    try:
        if kind == "duration" and isinstance(raw, str | int | float):
            return parse_duration(raw)
        if kind == "size" and isinstance(raw, str):
            return parse_size(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    wanted = _TYPES[kind]
    if isinstance(raw, bool) != (kind == "boolean") or not isinstance(raw, wanted):
        raise ConfigError(f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not {type(raw).__name__}")
    return raw


def _qualified(where: str, message: str) -> str:
    """The declare parser's ``message`` with the field it names written as the file's key."""
    named = _FIELD.search(message)
    if named is None:
        return f"{where}: {message}"
    key = named.group(1)
    full = f"{where}.history.{key}" if key in _HISTORY else f"{where}.{key}"
    return message[: named.start()] + full + message[named.end() :]


def _key(name: str) -> str:
    # A queue name may hold dots, which TOML reads as nesting unless the key is quoted; JSON's quoting is TOML's.
    return json.dumps(name)


def render_queues(queues: tuple[DeclaredQueue, ...]) -> list[str]:
    """``queues`` as TOML tables that :func:`queues_from_toml` reads back to the same options: each option that
    is not its default, durations in seconds, sizes in bytes."""
    lines: list[str] = []
    defaults = QueueOptions()
    for q in queues:
        lines += ["", f"[queues.{_key(q.name)}]"]
        for f in dataclasses.fields(QueueOptions):
            value = getattr(q.options, f.name)
            if value != getattr(defaults, f.name):
                lines.append(f"{f.name} = {_toml(value)}")
    return lines


def _toml(value: Any) -> str:
    if isinstance(value, HistoryOptions):
        fields = ", ".join(f"{f.name} = {_toml(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return "{ " + fields + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))
