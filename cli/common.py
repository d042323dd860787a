"""What several commands parse or print the same way."""
from __future__ import annotations

import click

from combireg.errors import CombiregError


def channel_paths(value: str, role: str) -> list[str]:
    """``A.nii.gz,B.nii.gz`` -> the channel files of one side (at least one)."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise CombiregError(f"{role}: no image file given")
    return paths


def echo_registration(report: dict, method: str = "") -> None:
    """The line every registration command prints: wall time, peak memory, Jacobian; and, when the
    run switched to the cross-sequence similarity, a line that says so."""
    jac = report["jacobian"]
    by = f" with {method}" if method else ""
    click.echo(f"registered{by} in {report['wall_time_s']:.1f} s (peak memory {report['peak_memory_mb']:.0f} MB); "
               f"Jacobian min {jac['min']:.3f}, {jac['percent_nonpositive']:.3f}% folded")
    sequences = report.get("sequences") or {}
    if sequences.get("action") == "cross-sequence similarity":
        click.echo(f"source and target look like different sequences ({sequences['reason']}): "
                   f"optimised with the cross-sequence similarity of "
                   f"params/cross_sequence.txt (SequenceChangeDetection \"false\" keeps the default's)")
