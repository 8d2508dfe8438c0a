"""Overlapping partition files for the scale-out test and benchmark (tests/e2e/test_scaleout.py,
bench/bench_scaleout.py)."""

from __future__ import annotations

from pathlib import Path


def write_overlapping(folder: Path, files: int, per_file: int, overlap: int) -> set[str]:
    """``files`` CSV files in ``folder``; file k holds contacts k*step .. k*step+per_file-1 (step = per_file -
    overlap), so it shares ``overlap`` contacts with the next, whose copies have another first name (Q instead of
    P), and one row with a bad email. Returns the emails of every valid contact."""
    folder.mkdir()
    step = per_file - overlap
    for k in range(files):
        lines = ["First Name,Last Name,Email Address,Company"]
        lines += [f"{'Q' if k and i < k * step + overlap else 'P'}{i},Tester,person{i}@example.com,Acme {i % 7}"
                  for i in range(k * step, k * step + per_file)]  # fmt: skip
        lines.append(f"Bad{k},Row,not-an-email-{k},Acme")
        (folder / f"part-{k}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {f"person{i}@example.com" for i in range((files - 1) * step + per_file)}
