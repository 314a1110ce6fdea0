"""GPU health from NVML: ``readings`` asks (counters as plain data), ``rules`` judges (pure
functions), ``watch`` compares the start of the run with its end (a plugin)."""
