"""The repository stands alone: nothing in it points at design files kept outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
OUTSIDE = re.compile(r"\.\./shared|\b(?:ARCHITECTURE|TELEMETRY|LIVE_PROTOCOL|STYLE)\.md\b")


def test_no_file_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in tracked.splitlines():
        path = ROOT / name
        if path.is_symlink() or not path.is_file() or path.suffix in {".png", ".ico"}:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            # This file names the pattern it looks for.
            if OUTSIDE.search(line) and path != Path(__file__):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == [], "\n".join(found)
