"""Data from your own Python: a function (or ONNX Runtime CalibrationDataReader) that yields feed dicts.

``hook:my_package.calib:feeds`` imports ``my_package.calib`` (from the current folder too) and
``path/to/calib.py:feeds`` loads that file; ``?key=value&...`` after the spec is passed as keyword string
arguments. The named attribute may be

  * a function returning (or generating) an iterable of dicts ``{input name: ndarray}``,
  * an object or class with ``get_next()`` returning such dicts and then None (a CalibrationDataReader;
    a class is instantiated with the keyword arguments).

Each dict is one batch with the samples on axis 0 (an array one rank short of the input is one sample); an
optional ``labels`` key holds integer class labels. The feeds are written to an unlinked temporary file as
they arrive and memory-mapped, so the hook may yield more data than fits in memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from onnx_inher.datasets.streams import Spill
from onnx_inher.errors import InputError

HOOK = "hook"
LABELS = "labels"


def is_hook_path(spec: str) -> bool:
    """``something.py:function`` (a file path, not a named adapter)."""
    head, sep, attr = spec.partition("?")[0].rpartition(":")
    return bool(sep) and head.endswith(".py") and attr.isidentifier()


def resolve(spec: str, target: str, options: dict[str, str]) -> Any:
    """The hook object `target` names: ``module.path:attr`` or ``file.py:attr``."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise InputError(f"data '{spec}': write hook:MODULE:FUNCTION (e.g. hook:calib:feeds) or "
                         "path/to/file.py:FUNCTION.")
    module = _load_file(spec, Path(where)) if where.endswith(".py") else _import(spec, where)
    if not hasattr(module, attr):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise InputError(f"data '{spec}': {module.__name__} has no '{attr}'; its callables are {names}.")
    return getattr(module, attr)


def _load_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise InputError(f"data '{spec}': {path} not found; give the Python file that defines the hook.")
    _on_path(str(path.resolve().parent))
    name = f"onnx_inher_hook_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise InputError(f"data '{spec}': {path} is not a Python file.")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    _guarded(spec, lambda: loader.loader.exec_module(module), f"loading {path}")  # type: ignore[union-attr]
    return module


def _import(spec: str, name: str) -> ModuleType:
    _on_path(os.getcwd())  # `hook:calib:feeds` finds calib.py in the folder you run from
    try:
        return _guarded(spec, lambda: importlib.import_module(name), f"importing {name}")
    except InputError as err:
        missing = err.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name and name.startswith(missing.name):
            raise InputError(f"data '{spec}': no module '{name}' (looked on sys.path and in {os.getcwd()}); "
                             "run from the folder that holds it, or give path/to/file.py:FUNCTION.") from None
        raise


def _on_path(folder: str) -> None:
    """Append `folder` to sys.path (last, so it never shadows an installed module): the hook may import its
    neighbours, also later, while it yields."""
    if folder not in sys.path:
        sys.path.append(folder)


def _guarded(spec: str, call: Any, doing: str) -> Any:
    """Run user code; an exception becomes one line naming it and where in the user's file it was raised."""
    try:
        return call()
    except InputError:
        raise
    except Exception as err:
        raise user_error(spec, err, doing) from err


def user_error(spec: str, err: BaseException, doing: str) -> InputError:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "onnx_inher" not in f.filename
              and "importlib" not in f.filename]
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return InputError(f"data '{spec}': {doing} raised {type(err).__name__}: {err}{at}; fix the hook.")


def feeds(spec: str, hook: Any, options: dict[str, str]) -> Iterator[dict]:
    """The feed dicts a hook yields, whatever form it takes."""
    made = hook
    if inspect.isclass(hook) or (callable(hook) and not hasattr(hook, "get_next")):
        made = _guarded(spec, lambda: hook(**options), "calling the hook")
    elif options:
        raise InputError(f"data '{spec}': options {sorted(options)} need a function or class to pass them to.")
    if hasattr(made, "get_next"):
        def pull() -> Iterator[dict]:
            while (item := _guarded(spec, made.get_next, "get_next()")) is not None:
                yield item
        return pull()
    if isinstance(made, dict):
        return iter([made])
    try:
        iterator = iter(made)
    except TypeError:
        raise InputError(f"data '{spec}': the hook returned {type(made).__name__}; return an iterable of dicts "
                         "{input name: array} (or an object with get_next()).") from None

    def guarded() -> Iterator[dict]:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except InputError:
                raise
            except Exception as err:
                raise user_error(spec, err, "the hook's iteration") from err
            yield item
    return guarded()


def hook_arrays(spec: str, target: str, options: dict[str, str], specs: Sequence) -> tuple[dict, np.ndarray | None]:
    """Run the hook to its end, spilling each input to disk: `{name: memory map}` and the labels."""
    hook = resolve(spec, target, options)
    ranks = {s.name: len(s.shape) for s in specs}
    spills: dict[str, Spill] = {}
    labels: list[np.ndarray] = []
    count = 0
    for k, item in enumerate(feeds(spec, hook, options)):
        if not isinstance(item, dict):
            raise InputError(f"data '{spec}': item {k} is {type(item).__name__}, not a dict {{input name: array}}.")
        names = sorted(n for n in item if n != LABELS)
        if spills and names != sorted(spills):
            raise InputError(f"data '{spec}': item {k} has inputs {names}, earlier items had {sorted(spills)}; "
                             "yield the same inputs every time.")
        sizes = set()
        for name in names:
            value = np.asarray(item[name])
            if name in ranks and value.ndim == ranks[name] - 1:
                value = value[None]  # one sample without its batch axis
            spills.setdefault(name, Spill(f"data '{spec}': input '{name}'")).append(value)
            sizes.add(len(value))
        if LABELS in item:
            y = np.asarray(item[LABELS]).reshape(-1)
            labels.append(y)
            sizes.add(len(y))
        if len(sizes) > 1:
            raise InputError(f"data '{spec}': item {k} mixes batch sizes {sorted(sizes)}; every array of one "
                             "item needs the same number of samples on axis 0.")
        count += 1
    if count == 0:
        raise InputError(f"data '{spec}': the hook yielded nothing; it must yield at least one feed dict.")
    if labels and len(labels) != count:
        raise InputError(f"data '{spec}': only some items carry '{LABELS}'; give them with every item or none.")
    arrays = {name: spill.array() for name, spill in spills.items()}
    return arrays, (np.concatenate(labels) if labels else None)
