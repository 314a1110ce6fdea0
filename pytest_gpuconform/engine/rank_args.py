"""The command line of a rank's own pytest session, derived from the controller's.

A rank repeats the controller's invocation arguments (so the same rootdir, ini file,
conftests, plugins and ``-p``/``-o``/``-W`` options apply; ``PYTEST_ADDOPTS`` and ini
``addopts`` are read again from the same environment and file) and adds its own:

* ``--capture=no``: the rank's output goes straight to its log (fd level), so a test's
  output survives a crash of the rank, and the report shows it per rank;
* ``--randomly-seed=N`` under pytest-randomly: every rank reseeds from the controller's seed;
* ``--no-cov`` under pytest-cov: the controller's coverage run combines the ranks' data
  (coverage's own subprocess support measures them), a rank must not report on its own.

Plugins and options a rank must not act on at all (JUnit, --pdb, xdist, reruns) are turned
off inside the rank (rank/session.py), not here: removing their flags would make the
rank's argument parsing fail where users pass them.
"""

from __future__ import annotations

import pytest


def rank_arguments(config: pytest.Config) -> tuple[str, ...]:
    """The pool adds each rank's ``--basetemp`` and a cache directory of its own."""
    args = [str(arg) for arg in config.invocation_params.args]
    args.append("--capture=no")
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and isinstance(seed, int):
        args.append(f"--randomly-seed={seed}")
    if config.pluginmanager.hasplugin("_cov"):
        args.append("--no-cov")
    return tuple(args)
