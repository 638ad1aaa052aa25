"""Fixtures of the graph_pipeline tests: fresh fallback warnings for every test, and ``CapturedPipeline`` capturing on
the CPU, into a :class:`StandInGraph` (``stand_in_capture``) or a :class:`FrozenArgsGraph` (``frozen_args_capture``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from stand_in_graphs import FrozenArgsGraph, StandInGraph, capture_on_host

from fastflow import graph_pipeline as gp
from fastflow.graph_pipeline import PipelineFallbackWarning, captured


@pytest.fixture(autouse=True)
def _fresh_warnings():
    captured._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineFallbackWarning)
        yield


@pytest.fixture
def stand_in_capture(monkeypatch):
    monkeypatch.setattr(gp.CapturedPipeline, "_capture", lambda self, trace: capture_on_host(self, trace, StandInGraph))
    monkeypatch.setattr(gp.CapturedPipeline, "blockers", lambda self, kwargs=None: [])


@pytest.fixture
def frozen_args_capture(monkeypatch):
    """``CapturedPipeline._capture`` itself runs on the CPU, :class:`FrozenArgsGraph` as its CUDA graph."""
    import contextlib

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    for name, value in {
        "device": lambda *a: contextlib.nullcontext(), "stream": lambda *a: contextlib.nullcontext(),
        "Stream": Stream, "current_stream": lambda *a: Stream(), "synchronize": lambda *a: None,
        "memory_reserved": lambda *a: 0, "CUDAGraph": FrozenArgsGraph, "get_sync_debug_mode": lambda: 0,
        "set_sync_debug_mode": lambda mode: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(gp.CapturedPipeline, "blockers", lambda self, kwargs=None: [])
