"""Root causes: failures that differ only in their numbers or names are one cause.

"activation_ratio 0.91 > bound 0.5" on one node and "activation_ratio 0.93 > bound 0.5" on
another are the same defect, and so are the 193 strict-acceptance failures of a node
without a driver and the 6 setup errors of fixtures that stopped for the same reason. The
page (and the terminal) list a cause once, with how many results and which hosts share it,
instead of one row per result.

``cause_of`` reduces a one-line reason to its cause: pytest's wrappers are removed
(``failed on setup with "..."``, ``Failed: ``, a ``rank N:`` prefix) and what varies between
nodes is masked: numbers standing on their own (not the 100 of H100 or the 16 of fp16),
GPU UUIDs, PCI bus ids, hex values and the node's own name.
"""

from __future__ import annotations

import re

_WRAPPED = re.compile(r'^failed on (?:setup|teardown|call) with "(.*)"$')
_PREFIXES = re.compile(r"^(?:rank \d+: |Failed: )+")
_MASKS = (
    (re.compile(r"GPU-[0-9a-fA-F-]{8,}"), "GPU-<uuid>"),
    (re.compile(r"\b[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b"), "<pci>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])"), "#"),
)
MAX_CAUSE = 240


def unwrap(reason: str) -> str:
    """The reason without pytest's and the rank fold's wrappers."""
    text = reason.strip()
    for _ in range(3):
        match = _WRAPPED.match(text)
        if match:
            text = match.group(1)
        stripped = _PREFIXES.sub("", text)
        if stripped == text and not match:
            break
        text = stripped
    return text


def cause_of(reason: str, host: str = "") -> str:
    text = unwrap(reason)
    if host:
        text = text.replace(host, "<host>")
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:MAX_CAUSE] or "(no message)"
