"""The multi-rank engine: runs a test in N rank processes with a process group, each rank a
pytest worker running the real item.

Controller side (the pytest process):

* ``plugin``: the pytest hooks that route tests to rank pools (by their ``TestPlan``) and
  give pytest one report per phase; pytest-timeout's timer left to the ranks;
* ``pool``: the handle on one set of ranks: start (forked from a fork server), send,
  receive, stacks of hung ranks, kill with everything below;
* ``attempt``: one test followed in every rank to its end, with a deadline and a grace;
* ``verdict``: the ranks' phase reports (or their silence) folded per phase;
* ``findings``: what a test left in its ranks, as a warning, a property or a failure;
* ``rank_args``, ``logs``, ``interrupts`` (SIGTERM/SIGINT), ``gpu_lease`` (under -n).

Rank side (``rank/``, imports nothing of the controller side): ``process`` (entry point),
``session`` (the rank's pytest session), ``collect`` (lazy collection), ``isolation`` and
``torch_state`` (a test's boundary), ``groups`` (the default process group), ``processes``
(process trees), ``environment`` (the seam for a rank's environment and group options),
``spec`` and ``messages`` (what the rank is started with, and what crosses the pipe).

Logging: ``logging.getLogger("pytest_gpuconform.engine")`` says at debug level when pools
start, are discarded or killed, and when GPUs are leased (``--log-level=DEBUG``).
"""
