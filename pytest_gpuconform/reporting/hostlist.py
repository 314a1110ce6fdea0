"""Many host names in a few characters, the way Slurm writes them: ``gpu-[0001-0040,0042]``.

The page names every host that shares a failure or an outlier value; a thousand names in
full would bury the page, and the compressed form pastes straight into ``scontrol``,
``sinfo -n`` or ``pdsh -w``.
"""

from __future__ import annotations

import re

_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def _ranges(numbers: list[int], width: int) -> str:
    parts, start, previous = [], numbers[0], numbers[0]
    following: list[int | None] = [*numbers[1:], None]
    for number in following:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(f"{start:0{width}d}" if start == previous else f"{start:0{width}d}-{previous:0{width}d}")
        if number is not None:
            start = previous = number
    return ",".join(parts)


def groups(hosts: list[str]) -> list[str]:
    """One Slurm hostlist expression per name pattern, in first-seen order."""
    groups: dict[tuple[str, str, int], set[int]] = {}
    plain: list[str] = []
    natural: list[tuple[str, str, str]] = []
    for host in dict.fromkeys(hosts):
        match = _NUMBERED.match(host)
        if match is None:
            plain.append(host)
            continue
        prefix, digits, suffix = match.groups()
        if digits.startswith("0") and len(digits) > 1:  # zero-padded: its width is fixed
            groups.setdefault((prefix, suffix, len(digits)), set()).add(int(digits))
        else:
            natural.append((prefix, digits, suffix))
    for prefix, digits, suffix in natural:  # gpu-1000 joins gpu-[0001-0999]; x9 and x10 share x[9-10]
        key = (prefix, suffix, len(digits)) if (prefix, suffix, len(digits)) in groups else (prefix, suffix, 1)
        groups.setdefault(key, set()).add(int(digits))
    texts = []
    for (prefix, suffix, width), numbers in groups.items():
        ordered = sorted(numbers)
        if len(ordered) == 1:
            texts.append(f"{prefix}{ordered[0]:0{width}d}{suffix}")
        else:
            texts.append(f"{prefix}[{_ranges(ordered, width)}]{suffix}")
    return texts + plain


def compress(hosts: list[str]) -> str:
    """Hosts as Slurm hostlist expressions, comma-separated."""
    return ",".join(groups(hosts))


def shortened(hosts: list[str], limit: int = 400) -> str:
    """``compress`` cut at a group boundary near ``limit`` characters, saying how many more."""
    parts = groups(hosts)
    text = ",".join(parts)
    if len(text) <= limit:
        return text
    shown = ""
    for part in parts:
        candidate = f"{shown},{part}" if shown else part
        if len(candidate) > limit:
            if not shown:  # one long group: cut inside its brackets, at a range boundary
                cut = part.rfind(",", 0, limit)
                shown = part[:cut] + ",…]" if cut > 0 else part[:limit] + "…"
            break
        shown = candidate
    return f"{shown} … ({len(set(hosts))} hosts in all)"
