"""Reports: the JUnit toolkit (``junit``), ``gpuconform merge`` (``merge``), the page of
``gpuconform report`` (``html``, ``charts``, ``templates/``), the terminal table
(``summary``), what ``record()`` stores (``records``) and which recorded numbers are
measurements with bounds (``measures``), plus the plugin that wires them into a run."""
