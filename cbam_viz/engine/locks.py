"""The one lock of each model object: every pass over a model (explanation, attention, faithfulness) holds it.

Its own module, below everything that runs a model: the hook and CAM layers take the lock without
importing the loading layer, and the loader hands each :class:`~cbam_viz.engine.loading.LoadedModel`
the lock of its module object.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

__all__ = ["model_lock", "models_locked"]

_model_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one lock of a model object, taken by every pass over it (explanation, attention, faithfulness).

    Hooks live on modules, so a forward that runs while another thread's hooks are attached feeds
    that thread's recorders. Every forward over a model therefore holds this lock; it belongs to
    the module object, so two pairs that share a model (one manifest record in both) share its lock.
    Re-entrant: an explanation that holds it may call helpers that take it again.
    """
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def models_locked(*models: nn.Module) -> Iterator[None]:
    """Hold :func:`model_lock` of every model (each once) for the ``with`` block.

    The locks are taken in one global order (by object id), so two threads locking the same
    models, whatever order they name them in, cannot deadlock.
    """
    unique = {id(m): m for m in models}
    with contextlib.ExitStack() as stack:
        for key in sorted(unique):
            stack.enter_context(model_lock(unique[key]))
        yield
