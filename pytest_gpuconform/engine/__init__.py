"""The multi-rank engine: runs a test body in N rank processes with a process group.

Split by job:

* ``messages``: what crosses the pipe between the controller and a rank (plain data only).
* ``rank_process``: the loop a rank runs; it initialises the process group once and then
  executes test after test, so spawn and rendezvous are paid once per (world size, backend).
* ``module_loader``: imports test modules inside a rank, with pytest's assertion rewriting.
* ``rank_pool``: the controller's handle on one set of ranks: start, send a test, wait with
  a deadline, collect stacks of hung ranks, kill.
* ``verdict``: turns what the ranks reported (or failed to) into one test outcome.
* ``pytest_bridge``: the pytest hooks that route tests to the engine and report.
* ``cluster``: cluster mode, when pytest itself was launched by torchrun or srun.
"""
