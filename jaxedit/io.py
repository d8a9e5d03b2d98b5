"""Files, provenance and progress lines: atomic writes, the checkout's git revision and changes, one logger.

`staged(target)` yields a temporary path beside `target` and renames it onto `target` only when
the block succeeds (a file is fsynced first), so readers see the old `target` or the whole new one.
`exclusive(target)` holds a lock beside `target` so concurrent processes build it one at a time.
`say` prints a progress line `[HH:MM:SS] message` on stderr through the `jaxedit` logger;
library notes go to the same logger at DEBUG (shown when the environment sets JAXEDIT_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file `<target>.lock` (created) until the block ends; other holders wait."""
    lock_path = Path(f"{os.fspath(target)}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, directory: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary file (or, with `directory`, an empty folder) beside `target` to fill, then renamed onto it.

    On an error in the block the temporary is removed and `target` is untouched. keep_existing: if
    the rename fails because `target` appeared meanwhile (a concurrent writer), keep theirs.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not directory:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        try:
            os.replace(tmp, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to `path` so that readers see the old file, or the whole new one."""
    with staged(path) as tmp:
        (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """Commit of the jaxedit checkout this code runs from ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@functools.lru_cache(maxsize=1)
def source_changes() -> str | None:
    """Digest of the package's uncommitted changes (diffs to tracked files, untracked files); None when there
    are none or outside a git checkout."""
    package = Path(__file__).parent
    try:
        diff, untracked = (subprocess.run(["git", *args, "--", "."], cwd=package, capture_output=True, timeout=10)
                           for args in (["diff", "HEAD"], ["ls-files", "-z", "--others", "--exclude-standard"]))
    except (OSError, subprocess.SubprocessError):
        return None
    if diff.returncode or untracked.returncode or not (diff.stdout or untracked.stdout):
        return None
    digest = hashlib.sha256(diff.stdout)
    for name in sorted(filter(None, untracked.stdout.split(b"\0"))):
        digest.update(name + (package / os.fsdecode(name)).read_bytes())
    return digest.hexdigest()[:12]


class _Stderr(logging.Handler):
    """Writes to the current `sys.stderr` (looked up per line, so redirections and pytest's capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


logger = logging.getLogger("jaxedit")
logger.setLevel(logging.DEBUG if os.environ.get("JAXEDIT_DEBUG") else logging.INFO)
logger.propagate = False
_handler = _Stderr()
_handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
logger.addHandler(_handler)


def say(message: str) -> None:
    """One progress line on stderr: `[HH:MM:SS] message`."""
    logger.info(message)
