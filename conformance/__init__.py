"""The shipped conformance suite (installed as ``pytest_gpuconform.conformance``)."""
