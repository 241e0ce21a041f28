"""JSON written piece by piece, so a large API answer is never built whole in memory.

``iter_json(obj)`` yields UTF-8 chunks of the same text ``json.dumps(obj, ensure_ascii=False)``
would give, except that two kinds of value are expanded while writing:

* any iterator or generator becomes a JSON array, its items encoded one by one as they
  are produced (rows straight off a database cursor);
* a ``Later`` becomes whatever its function returns *when the writer reaches it*, so a
  count or a "next page" link can follow the rows it depends on (``OMIT`` leaves the key out);
* an ``Encoded`` item of such an array is JSON text already: one or more comma-separated
  items, written as they are (encoding rows a thousand at a time is ~5x faster than one
  by one).

Chunks are gathered up to ``chunk`` bytes to keep the number of socket writes small.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

_encode = json.JSONEncoder(ensure_ascii=False).encode


class Later:
    """A value computed when the writer gets to it (after the arrays before it were written)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


OMIT = object()  # a Later that returns this leaves its key out of the object


class Encoded(str):
    """JSON text for one or more array items, comma-separated, never empty."""


def encoded_items(items: list[Any]) -> Encoded:
    """A batch of array items as one ``Encoded`` (one call into the C encoder)."""
    return Encoded(_encode(items)[1:-1])


def _parts(obj: Any) -> Iterator[str]:
    if isinstance(obj, Later):
        obj = obj.fn()
    if isinstance(obj, dict):
        yield "{"
        first = True
        for k, v in obj.items():
            if isinstance(v, Later):
                v = v.fn()
                if v is OMIT:
                    continue
            yield ("" if first else ",") + _encode(str(k)) + ":"
            first = False
            yield from _parts(v)
        yield "}"
    elif isinstance(obj, Iterator):
        yield "["
        for i, item in enumerate(obj):
            if i:
                yield ","
            if isinstance(item, Encoded):
                yield item
            else:
                yield from _parts(item)
        yield "]"
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, Iterator, Later)) for v in obj):
        yield from _parts(iter(obj))
    else:
        yield _encode(obj)


def iter_json(obj: Any, chunk: int = 64 * 1024) -> Iterator[bytes]:
    buf: list[str] = []
    size = 0
    for part in _parts(obj):
        buf.append(part)
        size += len(part)
        if size >= chunk:
            yield "".join(buf).encode()
            buf, size = [], 0
    if buf:
        yield "".join(buf).encode()
