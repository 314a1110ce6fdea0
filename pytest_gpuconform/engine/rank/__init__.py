"""Code that runs only inside rank processes.

Nothing here imports the controller side of the engine (``engine.plugin``, ``pool``,
``verdict``): a rank is forked from the fork server (spawned where there is none), never
from the controller, and must not pay for, or depend on, the controller's state.
``messages`` is the protocol both sides speak.
"""
