"""What ``convert`` and ``fuse`` did to each norm they saw: the report.

Every norm module of the model gets one entry: ``replaced`` (by what),
``folded`` (into which conv), ``kept`` (left as it is, and why) or ``skipped``
(it was asked for, and could not be done: why). The convs and mmnorm modules
they replace get entries too. An entry is ``refused`` when a norm the
call was asked to handle stayed as it was (a BatchNorm-family norm that
``fuse`` could not fold, or ``convert`` could not replace or give its conv);
``strict=True`` turns those into one error listing them.
"""
from collections import Counter
from typing import NamedTuple


class Entry(NamedTuple):
    path: str  # qualified module name ('<root>' for the model itself)
    what: str  # its class name
    action: str  # 'replaced', 'folded', 'kept' or 'skipped'
    detail: str  # by what / into what / why
    refused: bool  # a norm the call was asked to handle, left as it was


class SurgeryError(RuntimeError):
    """``strict=True`` and a norm was kept or skipped."""


class SurgeryReport(list):
    """The :class:`Entry` list of one ``convert`` or ``fuse`` call."""

    ACTIONS = ('replaced', 'folded', 'kept', 'skipped')

    def add(self, path, module, action, detail, refused=False):
        self.append(Entry(path or '<root>', type(module).__name__, action, detail, refused))

    def counts(self):
        """Counter of (action, class name)."""
        return Counter((entry.action, entry.what) for entry in self)

    def summary(self):
        """One line per action: the classes and how many."""
        counts = self.counts()
        lines = []
        for action in self.ACTIONS:
            items = sorted((what, n) for (kind, what), n in counts.items() if kind == action)
            lines.append(f'{action}: ' + (', '.join(f'{what}: {n}' for what, n in items)
                                          if items else 'none'))
        return lines

    def lines(self):
        """Every entry as 'path (Class): action, detail'."""
        return [f'{e.path} ({e.what}): {e.action}, {e.detail}' for e in self]

    def refuse_if(self, strict, operation):
        """Raise :class:`SurgeryError` naming every refused entry, when ``strict``."""
        bad = [entry for entry in self if entry.refused]
        if strict and bad:
            listed = '; '.join(f'{e.path} ({e.what}): {e.action}, {e.detail}' for e in bad)
            raise SurgeryError(f'{operation}(strict=True): {len(bad)} norm layer(s) stayed as '
                               f'they were: {listed}')
