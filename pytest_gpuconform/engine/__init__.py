"""The multi-rank engine: runs a test body in N rank processes with a process group.

Controller side (the pytest process):

* ``plugin``: the pytest hooks that route tests to rank pools (by their ``TestPlan``) and
  turn what the ranks did into pytest outcomes;
* ``pool``: the handle on one set of ranks: start, send a test, wait with a deadline,
  collect stacks of hung ranks, kill;
* ``verdict``: what the ranks reported (or failed to) as one test outcome;
* ``gpu_lease``: node-local leases on whole GPUs under ``pytest -n``.

Rank side (``rank/``, spawned processes): ``process`` (the loop a rank runs),
``module_loader`` (imports test modules with pytest's assertion rewriting), ``fixtures``
(what only a rank can provide), ``messages`` (what crosses the pipe).

Logging: ``logging.getLogger("pytest_gpuconform.engine")`` says at debug level when pools
start, are discarded or killed, and when GPUs are leased (``--log-level=DEBUG``).
"""
