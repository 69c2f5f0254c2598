"""Recorders of what ran (kernel launches, op calls, backend decisions), shared by the CPU and GPU tests."""
from types import ModuleType


def count_calls(monkeypatch, module: ModuleType, names, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Wraps each function ``module.<name>`` so that it counts its calls in ``counts`` (a new dict unless
    given, to count several modules' functions in one); returns it, with 0 for each name now."""
    counts = {} if counts is None else counts
    counts.update(dict.fromkeys(names, 0))
    for name in names:
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


def record_triton_decisions(monkeypatch) -> list[tuple[str, bool]]:
    """Every ``backend.use_triton`` decision as (op, chosen): proves the Triton path ran, not a silent
    fallback."""
    from fastbert import backend

    decisions = []
    original = backend.use_triton

    def recording(op, tensor, **kwargs):
        chosen = original(op, tensor, **kwargs)
        decisions.append((op, chosen))
        return chosen

    monkeypatch.setattr(backend, "use_triton", recording)
    return decisions


def diverge_from_step(monkeypatch, step: int) -> None:
    """From optimizer step ``step`` on, every backward pass sees an infinite loss (the training core's
    divergence rule must stop the run): what an exploding run does, without an overflowing flag."""
    from fastbert.training.update import Updater

    backward = Updater.backward

    def diverging(self, loss):
        return backward(self, loss * float("inf") if self.step >= step else loss)

    monkeypatch.setattr(Updater, "backward", diverging)
