"""A unit as a value: ``Unit(layer, unit, polarity)``, printed ``L3.741 (−)``.

A unit ``(l, i)`` is coefficient ``i`` of layer ``l``'s FFN (the input of its ``down_proj``);
its polarity ``p`` (``+1`` / ``−1``) is the direction in which it writes a noun (``p · W_out[l][:, i]``).
``str(unit)`` is the one place the label ``L{layer}.{unit} (+/−)`` is built; tables, the
atlas, figures and widgets print units through it.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Unit(NamedTuple):
    layer: int
    unit: int
    polarity: int = 1

    def __str__(self) -> str:
        return f"L{self.layer}.{self.unit} ({'−' if self.polarity < 0 else '+'})"

    @classmethod
    def of(cls, row: Any) -> "Unit":
        """The unit of a table row, an atlas row, a dict or any object with ``layer``,
        ``unit`` and (optionally, default ``+1``) ``polarity``."""
        if isinstance(row, dict):
            get = row.get
        elif hasattr(row, "index") and hasattr(row, "get") and not isinstance(row, tuple):   # pandas Series
            get = row.get
        else:
            get = lambda key, default=None: getattr(row, key, default)   # noqa: E731 (itertuples rows)
        polarity = get("polarity", 1)
        return cls(int(get("layer")), int(get("unit")), -1 if int(polarity) < 0 else 1)
