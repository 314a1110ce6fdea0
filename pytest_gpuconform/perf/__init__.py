"""Performance: ``measure`` (GEMM TFLOP/s and all_reduce bus bandwidth, timed the same way
every run), ``floors`` (per GPU model, from data/perf_floors.json), ``peers`` (a GPU slower
than its neighbours), ``baseline`` (this node against the day it was accepted)."""
