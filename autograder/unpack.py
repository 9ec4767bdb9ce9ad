"""`python -m autograder.unpack ARCHIVE FOLDER`: a student's repository archive -> their lessons/.

Used by the class-grading workflow (autograder/templates/grade-class.yml) on the archive
GitHub makes of a student repository. Only regular files under the repository's `lessons/`
are written, under FOLDER, each at most MAX_FILE_BYTES; links, devices, absolute or `..`
paths and everything outside `lessons/` are skipped. Nothing in the archive is run.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path, PurePosixPath

MAX_FILE_BYTES = 20 * 2**20
MAX_FILES = 200


def unpack(archive: Path, target: Path) -> list[str]:
    """Write the archive's lessons/ files into `target`; return their paths, relative to it."""
    written: list[str] = []
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            # GitHub archives put everything under one top folder: OWNER-NAME-COMMIT/
            inside = parts[1:] if len(parts) > 1 else ()
            if not inside or inside[0] != "lessons" or len(inside) < 2:
                continue
            if not member.isfile() or member.size > MAX_FILE_BYTES or any(p in ("..", "") for p in inside):
                continue
            if len(written) >= MAX_FILES:
                break
            relative = Path(*inside[1:])
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            destination.write_bytes(source.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES])
            written.append(str(relative))
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m autograder.unpack ARCHIVE FOLDER", file=sys.stderr)
        return 2
    written = unpack(Path(argv[0]), Path(argv[1]))
    print(f"{argv[1]}: {len(written)} file(s) from lessons/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
