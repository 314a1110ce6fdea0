"""Imported by multiprocessing's fork server only (the pool's preload list), for one effect:
the fork server dies with the controller that started it.

Ranks are forked from the fork server and die with it (their own parent-death signal). The
server would otherwise outlive a controller killed by SIGKILL: every rank keeps the
server's "alive" pipe open. With this, a killed controller takes the server, and the server
its ranks, all by the kernel's parent-death signal.
"""

from __future__ import annotations

from . import processes

processes.die_with_parent()
