"""``checksums.sha256``: a ``sha256sum``-compatible manifest of the files a push uploads.

The file has one line per file, ``<64 hex digits>  <relative POSIX path>``, sorted by path, so
``sha256sum -c checksums.sha256`` run inside the directory checks it too. Hashing streams each file
in 1 MiB blocks, so multi-GB weight shards never sit in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import InputError

CHECKSUMS_FILE = "checksums.sha256"
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (symlinks are followed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check_relpath(rel: str) -> str:
    """A relative POSIX path that stays inside the directory, else ValueError."""
    if not rel or "\n" in rel or "\r" in rel or "\\" in rel:
        raise ValueError(f"unsupported file name for {CHECKSUMS_FILE}: {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or str(p) != rel:
        raise ValueError(f"unsupported file name for {CHECKSUMS_FILE}: {rel!r}")
    return rel


def write_checksums(directory: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Write ``<directory>/checksums.sha256`` for ``files`` and return its path.

    ``files`` are paths relative to ``directory`` (``str`` or ``Path``; absolute paths inside the
    directory are accepted and made relative). The manifest itself is never listed. Lines are sorted
    by path; the file is written to a temporary name and renamed, so a reader never sees half of it.
    Raises :class:`InputError` if a listed file does not exist.
    """
    root = Path(directory)
    rels: set[str] = set()
    for f in files:
        p = Path(f)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(root.resolve())
            except ValueError:
                raise InputError(f"{f} is not inside {root}") from None
        rel = _check_relpath(p.as_posix())
        if rel != CHECKSUMS_FILE:
            rels.add(rel)
    lines = []
    for rel in sorted(rels):
        target = root / rel
        if not target.is_file():
            raise InputError(f"cannot checksum {rel}: no such file in {root}")
        lines.append(f"{sha256_file(target)}  {rel}\n")
    out = root / CHECKSUMS_FILE
    tmp = root / f".{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_checksums(directory: str | os.PathLike) -> dict[str, str]:
    """Parse ``<directory>/checksums.sha256`` into ``{relative path: hex sha256}``.

    Raises :class:`InputError` when the manifest is missing or a line is malformed or points outside
    the directory.
    """
    manifest = Path(directory) / CHECKSUMS_FILE
    if not manifest.is_file():
        raise InputError(f"{manifest} not found: nothing to verify against")
    entries: dict[str, str] = {}
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition(" ")
        # sha256sum writes "  name" (text mode) or " *name" (binary mode).
        if sep and rel[:1] in (" ", "*"):
            rel = rel[1:]
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel:
            raise InputError(f"{manifest}: line {lineno} is not '<sha256>  <path>'")
        try:
            _check_relpath(rel)
        except ValueError:
            raise InputError(f"{manifest}: line {lineno} names a path outside the directory: {rel!r}") from None
        entries[rel] = digest
    return entries


def verify_checksums(directory: str | os.PathLike) -> None:
    """Check every file listed in ``<directory>/checksums.sha256``; return ``None`` when all match.

    Raises :class:`InputError` naming the first (in manifest order) file that is missing or whose
    sha256 differs. Files present but not listed are ignored (the Hub adds ``.gitattributes``).
    """
    root = Path(directory)
    for rel, expected in read_checksums(root).items():
        target = root / rel
        if not target.is_file():
            raise InputError(f"checksum check failed: {rel} is missing from {root}")
        actual = sha256_file(target)
        if actual != expected:
            raise InputError(
                f"checksum check failed: {rel} has sha256 {actual[:12]}..., expected {expected[:12]}..."
                " (corrupt or modified)"
            )
