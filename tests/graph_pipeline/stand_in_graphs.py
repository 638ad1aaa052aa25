"""CPU stand-ins for a CUDA graph, so that the capture and replay logic of ``fastflow.graph_pipeline`` runs without a
GPU: :class:`StandInGraph` reruns the recorded loop, :class:`RecordedStepsGraph` also takes the recorded steps,
:class:`FrozenArgsGraph` replays the ATen ops of its capture with their arguments frozen; :func:`capture_on_host` is
what ``CapturedPipeline._capture`` leaves behind. Imported by bare name (and by benchmarks/replay_host.py)."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from fastflow.graph_pipeline import params, recording


class StandInGraph:
    """Replays by rerunning the recorded loop and writing into the static outputs, as a CUDA graph would."""

    def __init__(self, fast, trace, originals):
        self.fast, self.trace, self.originals = fast, trace, originals

    def replay(self) -> None:
        trace, scheduler = self.trace, self.fast.scheduler
        if trace.seeds is not None:  # a real graph reads the captured seed tensor, whatever Python state says
            scheduler._ff_seed = 0
            scheduler._ff_seeds[(trace.device, trace.batch)] = trace.seeds
        with torch.no_grad():
            final = self.fast._run_trace(trace, self.originals)
        for dst, src in zip(recording.tree_tensors(trace.outputs), recording.tree_tensors(final), strict=True):
            dst.copy_(src)

    def reset(self) -> None:
        pass


def capture_on_host(fast, trace, make_graph) -> None:
    """What ``CapturedPipeline._capture`` leaves behind (seed buffer, parameters, static outputs), without CUDA:
    the recorded loop run once, and ``make_graph(fast, trace, originals)`` as its graph."""
    originals = fast._originals()
    if trace.stochastic:
        trace.seeds = fast.scheduler._ff_seed_tensor(trace.batch, trace.device)
    params.make_param_values(trace)
    with torch.no_grad():
        final = fast._run_trace(trace, originals)
    trace.outputs = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, final)
    trace.graph = make_graph(fast, trace, originals)
    trace.memory_bytes = 1


class RecordedStepsGraph(StandInGraph):
    """A stand-in that, as a CUDA graph does, takes the steps the recorded loop took (their indices are fixed in the
    captured kernels), whatever step the replaying call's loop starts at; the timesteps are still its inputs."""

    def replay(self) -> None:
        scheduler = self.fast.scheduler
        now = scheduler._begin_index, scheduler._step_index
        scheduler._begin_index, scheduler._step_index = self.trace.begin_index, None
        try:
            super().replay()
        finally:
            scheduler._begin_index, scheduler._step_index = now


class FrozenArgsGraph:
    """A CPU stand-in closer to a CUDA graph than :class:`StandInGraph`: it records the ATen ops of its capture and
    replays them with their arguments as captured (Python numbers, step indices and tensors alike), running no
    Python of the scheduler. Tensors the capture made stay held (a graph's private pool); tensors from before it are
    only weakly referenced, as a graph holds none: a replay that would read freed memory raises."""

    def __init__(self):
        self.ops: list | None = None

    def capture_begin(self, *args, **kwargs) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ops.append((func, (args, kwargs or {}), out))
                return out

        self.mode = Record()
        self.mode.__enter__()

    def capture_end(self) -> None:
        import itertools
        import weakref

        self.mode.__exit__(None, None, None)
        slots = itertools.count()
        made: dict[int, int] = {}  # id(tensor made during capture) -> slot
        self.pool: dict[int, torch.Tensor] = {}  # slot -> tensor with memory of its own (the pool)
        tape = []
        for func, inputs, out in self.ops:
            leaves, spec = pytree.tree_flatten(inputs)
            storages = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            refs = [("slot", made[id(t)]) if isinstance(t, torch.Tensor) and id(t) in made
                    else ("outside", weakref.ref(t)) if isinstance(t, torch.Tensor) else ("const", t) for t in leaves]
            outs = []
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    made[id(t)] = slot = next(slots)
                    if t.untyped_storage().data_ptr() not in storages:  # not a view of an input: pool memory
                        self.pool[slot] = t
                    outs.append(slot)
                else:
                    outs.append(None)
            tape.append((func, refs, spec, outs))
        self.ops.clear()  # the capture's references go: a graph holds none to what it did not allocate
        self.ops, self.mode, self.tape = None, None, tape

    def replay(self) -> None:
        env = dict(self.pool)
        with torch.no_grad():
            for func, refs, spec, outs in self.tape:
                leaves = []
                for kind, ref in refs:
                    if kind == "outside" and ref() is None:
                        raise RuntimeError(f"the graph's {func} reads a tensor from before its capture that was freed")
                    leaves.append(env[ref] if kind == "slot" else ref() if kind == "outside" else ref)
                args, kwargs = pytree.tree_unflatten(leaves, spec)
                for slot, t in zip(outs, pytree.tree_leaves(func(*args, **kwargs)), strict=True):
                    if slot in self.pool:
                        if t is not self.pool[slot]:
                            self.pool[slot].copy_(t)
                    elif slot is not None:
                        env[slot] = t

    def reset(self) -> None:
        self.tape = self.pool = None
