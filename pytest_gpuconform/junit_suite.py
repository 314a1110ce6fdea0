"""Suite-level JUnit properties (the node inventory), written by the controller.

``record_testsuite_property`` does nothing under xdist (the fixture runs in workers; only
the controller writes the XML, pytest#7767), so the controller adds the properties to
pytest's own LogXML object directly.
"""

from __future__ import annotations

import pytest


def add_suite_properties(config: pytest.Config, properties: list[tuple[str, str]]) -> None:
    from _pytest.junitxml import xml_key  # private, but stable since pytest 7

    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    for name, value in properties:
        xml.add_global_property(f"gpuconform.{name}", value)
