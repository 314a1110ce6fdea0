"""Collection: markers read and validated (``markers``), expanded into test ids
(``parametrize``), one ``TestPlan`` per item (``plan``), what this node can run
(``reasons``, ``policy``), dtypes and the tolerance table, and where the shipped suite is."""
