"""Cluster mode: pytest itself was launched once per rank by torchrun or srun.

``world`` detects the launcher's world, ``plugin`` joins it and keeps the ranks in step,
``fold`` collapses the per-rank JUnit files into one. The distributed engine is the
launcher's; the plugin only joins the world it made.
"""
