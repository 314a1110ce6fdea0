"""What a node must be and what a run verified: the acceptance spec (``--gpuconform-spec``)
and the one-line verdict every output states."""
