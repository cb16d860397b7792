"""The one writer of a measured result: ``FILE.json`` and ``FILE.md`` side by side.

Every benchmark (``benchmarks/*.py``) reports through :func:`write_results`, so their files share one
format: standard JSON (keys sorted, indent 2, a trailing newline, a non-finite number written as
``null``, because ``json.dumps`` would write a bare ``NaN``, which is not JSON) and the markdown as the
script renders it. Each file is written atomically (a temporary file, then a rename): a run killed
mid-write leaves the previous result whole, never half a file. It lives here, not in ``benchmarks/``,
because the benchmark scripts are not a package: they run as ``python benchmarks/NAME.py``, and the
tests load them by path.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from pathlib import Path

from .checkpointing import write_text_atomic


def standard_json(value):
    """``value`` with every float that is not finite as ``None``, tuples as lists and numpy scalars
    (``np.float32``, ``np.int64``) as Python numbers: what :func:`json.dumps` writes as standard JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def write_results(path, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``data`` to ``FILE.json`` and ``markdown`` to ``FILE.md``, creating the folder.

    Args:
        path: ``FILE.json`` or ``FILE`` (a benchmark's ``--out``); the two files are ``FILE.json`` and
            ``FILE.md`` beside each other (``run.v2`` gives ``run.v2.json`` and ``run.v2.md``).
        data: the result, JSON-serialisable after :func:`standard_json` (anything else is a
            ``TypeError`` before either file is touched).
        markdown: the rendered table; a trailing newline is added when it has none.
    Returns:
        ``(json_path, markdown_path)``.
    """
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict (the JSON object of a result), got {type(data).__name__}")
    if not isinstance(markdown, str):
        raise TypeError(f"markdown must be a str, got {type(markdown).__name__}")
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".json" else path
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    text = json.dumps(standard_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, text)
    write_text_atomic(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


__all__ = ["standard_json", "write_results"]
