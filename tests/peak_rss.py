"""Peak resident memory of one render, measured in a fresh process.

    python -m tests.peak_rss SOURCE_FILE WIDTH FORMAT [MAX_PIXELS]

prints one JSON object: the process's peak RSS (VmHWM) after start-up and imports, after
one render, and the render's own share. Used by the memory test and for the README figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> dict[str, object]:
    source, width, fmt = Path(argv[0]), int(argv[1]), argv[2]
    max_pixels = int(argv[3]) if len(argv) > 3 else 50_000_000
    from app.render import RenderOptions, render

    data = source.read_bytes()
    baseline = vm_hwm_mb()
    rendered = render(data, RenderOptions(width=width, quality=75, format=fmt, max_pixels=max_pixels))
    peak = vm_hwm_mb()
    return {
        "source": source.name,
        "source_mb": round(len(data) / 2**20, 2),
        "w": width,
        "format": fmt,
        "output": f"{rendered.width}x{rendered.height}",
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(peak, 1),
        "render_mb": round(peak - baseline, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
