"""GitHub Markdown for the reports: one table writer for every generated page."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; each cell as str() gives it."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
