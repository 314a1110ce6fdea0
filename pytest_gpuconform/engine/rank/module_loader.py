"""Import a test module inside a rank, with pytest's assertion rewriting.

Without rewriting, a plain ``assert a == b`` failing in a rank says only "AssertionError";
with it, the rank's message shows the compared values, as it would under pytest. The
rewriter is pytest's own (a private API, see compat.py); if it changes, we
fall back to a normal import and lose only the richer messages.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from typing import Any

from ... import compat


def _rewritten_code(path: str):
    with open(path, "rb") as handle:
        source = handle.read()
    tree = ast.parse(source, filename=path)
    compat.rewrite_asserts(tree, source)
    return compile(tree, path, "exec", dont_inherit=True)


def _exec_rewritten(name: str, path: str, spec) -> types.ModuleType:
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        try:
            code = _rewritten_code(path)
        except Exception:
            spec.loader.exec_module(module)
            return module
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load(module_name: str, module_file: str) -> types.ModuleType:
    """The module as the controller imported it: same name if importable, else by path."""
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) == module_file:
        return existing
    spec = None
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin != module_file:
        spec = importlib.util.spec_from_file_location(module_name, module_file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import test module {module_name} from {module_file}")
    return _exec_rewritten(module_name, module_file, spec)


def resolve(module: types.ModuleType, qualname: str, instance=None):
    """'test_x' or 'TestCls.test_x' -> a callable. Class tests are bound to the controller's
    instance (sent pickled), so state set by setup_method or class fixtures arrives too."""
    owner, _, name = qualname.rpartition(".")
    if not owner:
        return getattr(module, name)
    if instance is not None:
        return getattr(instance, name)
    cls: Any = module
    for part in owner.split("."):
        cls = getattr(cls, part)
    return getattr(cls(), name)
