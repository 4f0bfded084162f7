"""What the answers of one model version and shape share, serialized once (proto/wire.py).

The encoders (api/messages.py, api/kserve_messages.py) own this cache, not the served version:
an entry is keyed by the ServedEnsemble it was built for (weakly, so it goes with the version)
and by what else fixes the answer's head (the front end, the batch size, the outputs asked for).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, TypeVar

from snapserve.server.models.ensemble import ServedEnsemble

__all__ = ["AnswerHeads"]

T = TypeVar("T")
# Per version: batch sizes x output selections (KServe outputs may be named in any order).
_HEADS_PER_VERSION = 1024


class AnswerHeads:
    """`build(*args)`, made once per (version, key). Touched only on the event loop thread."""

    def __init__(self) -> None:
        self._heads: weakref.WeakKeyDictionary[ServedEnsemble, dict[tuple[object, ...], Any]] = (
            weakref.WeakKeyDictionary())

    def get(self, served: ServedEnsemble, key: tuple[object, ...], build: Callable[..., T],
            *args: object) -> T:
        heads = self._heads.get(served)
        if heads is None:
            heads = self._heads[served] = {}
        head = heads.get(key)
        if head is None:
            if len(heads) >= _HEADS_PER_VERSION:
                heads.clear()
            head = heads[key] = build(*args)
        return head  # type: ignore[no-any-return]
