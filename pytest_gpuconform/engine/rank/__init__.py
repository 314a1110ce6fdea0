"""Code that runs only inside rank processes.

Nothing here imports the controller side of the engine (``engine.plugin``, ``pool``,
``verdict``): a rank is a fresh spawned interpreter and must not pay for, or depend on, the
controller's state. ``messages`` is the protocol both sides speak.
"""
