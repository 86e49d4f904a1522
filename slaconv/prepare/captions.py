"""Reading captions into :class:`Item` s: a JSONL file, a CSV file or a folder of captioned media.

``--captions`` is one of:

* a ``.jsonl`` file, one ``{"file": "clip.mp4", "caption": "..."}`` object per line;
* a ``.csv`` file with a header holding ``file`` and ``caption`` columns;
* a folder of media, each with a same-named ``.txt`` caption (``cat.png`` + ``cat.txt``; a
  sub-folder of frames ``walk/`` + ``walk.txt``).

Relative ``file`` entries are looked up in ``--media-dir`` (default: the captions file's folder).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError
from ..utils.messages import first_line
from .media import IMAGE_EXTS, VIDEO_EXTS, frame_files, natural_key


@dataclass(frozen=True)
class Item:
    """One sample to encode: a media path (file or frame folder), how it was named, its caption."""

    path: Path
    label: str       # the name as written in the captions (for messages and the manifest)
    caption: str
    where: str       # "captions.jsonl:3" or the .txt file, for messages

    @property
    def kind(self) -> str:
        """``"frames"`` (a folder of frame images), ``"video"`` or ``"image"`` (stills and animations)."""
        if self.path.is_dir():
            return "frames"
        return "video" if self.path.suffix.lower() in VIDEO_EXTS else "image"


def _check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise InputError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise InputError(f"{where}: caption is empty")
    return caption


def _media_item(file: Any, caption: Any, media_dir: Path, where: str) -> Item:
    if not isinstance(file, str) or not file.strip():
        raise InputError(f"{where}: 'file' must be a non-empty string, got {file!r}")
    caption = _check_caption(caption, where)
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = media_dir / path
    if not path.exists():
        raise InputError(f"{where}: media file not found: {path}")
    return Item(path, file, caption, where)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({first_line(exc)})") from None


def _read_jsonl(path: Path, media_dir: Path) -> list[Item]:
    items = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: each line must be a JSON object with 'file' and 'caption'")
        missing = [k for k in ("file", "caption") if k not in row]
        if missing:
            raise InputError(f"{where}: missing key(s) {', '.join(missing)} (each line needs 'file' and 'caption')")
        items.append(_media_item(row["file"], row["caption"], media_dir, where))
    return items


def _read_csv(path: Path, media_dir: Path) -> list[Item]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
        header = reader.fieldnames or []
        if not {"file", "caption"} <= {h.strip() for h in header}:
            raise InputError(f"{path}:1: the header must name 'file' and 'caption' columns, got {header}")
        items = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            row = {k.strip(): v for k, v in row.items() if k is not None}  # None: surplus cells
            if row.get("file") is None or row.get("caption") is None:
                raise InputError(f"{where}: row has too few columns (needs file and caption)")
            if all(not (v or "").strip() for k, v in row.items() if k):
                continue  # blank line
            items.append(_media_item(row["file"], row["caption"], media_dir, where))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({first_line(exc)})") from None
    return items


def _is_media(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(frame_files(path))
    return path.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS


def _read_folder(folder: Path) -> list[Item]:
    items = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if not _is_media(path):
            continue
        txt = path.with_suffix(".txt") if path.is_file() else path.with_name(path.name + ".txt")
        if not txt.is_file():
            raise InputError(f"{path}: no caption file {txt.name} beside it (each media file needs a same-named .txt)")
        items.append(Item(path, path.name, _check_caption(_read_text(txt).strip(), str(txt)), str(txt)))
    return items


def read_captions(captions: str | os.PathLike, media_dir: str | os.PathLike | None = None) -> list[Item]:
    """Parse a captions JSONL/CSV file or a captioned media folder; check every media path exists."""
    path = Path(captions).expanduser()
    if not path.exists():
        raise InputError(f"captions not found: {path}")
    if path.is_dir():
        if media_dir is not None and Path(media_dir).resolve() != path.resolve():
            raise UsageError("--media-dir applies to a JSONL or CSV captions file, not a captions folder")
        items = _read_folder(path)
    else:
        base = Path(media_dir).expanduser() if media_dir is not None else path.parent
        if media_dir is not None and not base.is_dir():
            raise InputError(f"media directory not found: {base}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            items = _read_jsonl(path, base)
        elif suffix == ".csv":
            items = _read_csv(path, base)
        else:
            raise InputError(f"{path}: captions must be a .jsonl file, a .csv file, or a folder of media + .txt files")
    if not items:
        raise InputError(f"{path}: no media with captions found")
    return items
