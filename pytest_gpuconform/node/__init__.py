"""Facts about this node: what NVML and torch say, never by creating a CUDA context.

``nvml`` (one NVML session helper, GPUs and their visibility), ``labels`` (how a GPU is
named everywhere), ``inventory`` (versions, driver, GPUs), ``probe`` (CUDA's own view, asked
in a child process), ``pinning`` (which GPU tokens xdist workers get).
"""
