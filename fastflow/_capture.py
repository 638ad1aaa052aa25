"""What fastflow's two capture modes (:mod:`fastflow.graph`, :mod:`fastflow.graph_pipeline`) share: a bounded
warn-once memory for their fallback reasons, the stack level that points a warning at the user's call, and the
probe that finds which part of a warm-up loop synced the host."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from types import FrameType

import torch

__all__ = ["MAX_WARNED", "SyncProbe", "WarnedTexts", "is_sync_warning", "probing_syncs", "user_stacklevel"]

MAX_WARNED = 256


class WarnedTexts:
    """The texts a warn-once helper has warned, as an ordered set of at most ``MAX_WARNED`` (oldest out first):
    a fallback's reason can quote a shape or an exception, so a long-running server sees ever new ones."""

    def __init__(self) -> None:
        self._texts: OrderedDict[str, None] = OrderedDict()

    def first(self, text: str) -> bool:
        """Whether ``text`` is new (it is remembered from now on)."""
        if text in self._texts:
            self._texts.move_to_end(text)
            return False
        self._texts[text] = None
        if len(self._texts) > MAX_WARNED:
            self._texts.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._texts)

    def clear(self) -> None:
        self._texts.clear()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _next_external_frame(frame: FrameType) -> FrameType | None:
    """The next frame out that ``warnings.warn`` counts for ``stacklevel`` (it skips importlib's bootstrap)."""
    frame = frame.f_back
    while frame is not None and "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function point at the first frame outside
    fastflow: the user's call, however deep in fastflow the warning is raised (a fixed level breaks as soon as
    another fastflow function sits in between)."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        outer = _next_external_frame(frame)
        if outer is None:
            break
        frame, level = outer, level + 1
    return level


def is_sync_warning(w: warnings.WarningMessage) -> bool:
    """Whether a caught warning reports a CUDA host sync.

    torch's own notice that the sync debug mode is a prototype mentions syncs too; it is not one.
    """
    text = str(w.message).lower()
    return "synchronizing" in text and "prototype" not in text


class SyncProbe:
    """Attributes CUDA sync warnings raised in warm-up to the part of the loop that caused them."""

    def __init__(self, caught: list):
        self.caught = caught
        self.seen = 0
        self.culprit: str | None = None

    def mark(self, label: str) -> None:
        new = self.caught[self.seen :]
        self.seen = len(self.caught)
        if self.culprit is None:
            for w in new:
                if is_sync_warning(w):
                    self.culprit = f"{label} synchronizes with the host ({str(w.message).strip()})"
                    return


@contextlib.contextmanager
def probing_syncs() -> Iterator[SyncProbe]:
    """CUDA sync warnings on ("warn" debug mode) inside the block, recorded by the :class:`SyncProbe` it yields."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield SyncProbe(caught)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
