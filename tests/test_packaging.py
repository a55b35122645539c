"""Installing drop-worker is quiet and ships what it runs (issue 18 item 5: ~50 lines of
setuptools warnings about db.migrations on every install)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_building_the_package_prints_no_warnings_and_ships_the_migrations(tmp_path: Path) -> None:
    # a copy: setuptools writes build/ and *.egg-info/ into the tree it builds
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".data", "node_modules", "__pycache__", "build", "*.egg-info", ".*_cache"))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--quiet", str(source),
         "--wheel-dir", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    # pip's own notes about this machine's package-index mirrors are not the project's output
    output = [line for line in (built.stdout + built.stderr).splitlines()
              if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
    assert output == [], "\n".join(output[:20])
    wheel = next(wheels.glob("drop_worker-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("db/migrations/") for n in names if n.startswith("db/migrations/"))
    assert shipped == sorted(p.name for p in (ROOT / "db" / "migrations").glob("*.sql"))
    assert "worker/providers/neonomics.py" in names and "scheduler.py" in names
    # the console's templates and its static files (CSS, the one script) ship with it
    console = ROOT / "monitoring" / "console"
    for kind in ("templates", "static"):
        expected = sorted(p.name for p in (console / kind).iterdir())
        assert expected and sorted(n.rsplit("/", 1)[1] for n in names
                                   if n.startswith(f"monitoring/console/{kind}/")) == expected, kind
