"""`pip install .` ships the sweep configs: the wheel holds every file of configs/, byte for byte."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_config(tmp_path):
    src = tmp_path / "src"  # a clean copy: a stale build/ in the checkout would leak old files into the wheel
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv", "results", "runs"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("jaxedit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {name.removeprefix("jaxedit/configs/"): z.read(name) for name in z.namelist()
                   if name.startswith("jaxedit/configs/") and not name.endswith("/")}
    configs = ROOT / "configs"
    assert configs.is_symlink()  # one copy of the files: the checkout's configs/ is jaxedit/configs
    source = {p.relative_to(configs).as_posix(): p.read_bytes() for p in configs.rglob("*") if p.is_file()}
    assert "default.yaml" in source and "models/gemma-2-9b.json" in source
    assert shipped == source
