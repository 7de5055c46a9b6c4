"""JSON Lines reading shared by corpus and label files (``calib.corpus``) and batch uploads
(``calib.store.service``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def iter_jsonl(lines: Iterable[str], error: Callable[[int, str], Exception]) -> Iterator[tuple[int, Any]]:
    """(line number counted from 1, decoded value) of every non-blank line; a line that is not valid JSON raises
    ``error(line_number, "invalid JSON (<reason>)")``."""
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, and integers over Python's 4300-digit conversion limit
            raise error(no, f"invalid JSON ({getattr(exc, 'msg', exc)})") from exc
        yield no, value
