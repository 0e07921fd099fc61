"""Download the face datasets (CrossFaceID, FaceID-70K, FaceID-6M) from the Hugging Face Hub and extract them.

Layout under ``out_dir``::

    out_dir/raw/...            the repository files as on the Hub (archive parts, READMEs, caption files)
    out_dir/data/...           everything extracted from the archives
    out_dir/.extracted/X.done  one marker per archive once it is completely extracted (JSON: parts, members)
    out_dir/index/index.jsonl  the training index, only with ``build_index=True`` (written by get_face_info.py,
                               with index/embeddings/ and index/rejects.jsonl)

Split archives (``laion_1024.tar.gz.aa``, ``.ab``, ...; or ``.000``, ``.001``, ...) are extracted by streaming the
parts in order through :class:`ChainedParts`, a read-only file-like object, into one
``tarfile.open(fileobj=..., mode="r|gz")`` reader: the concatenated archive is never written to disk (FaceID-6M
is ~1.3 TB). Parts are fetched lazily, one when the reader reaches it, so with ``delete_parts=True`` the peak
disk use is the extracted data plus one part.

Resuming: downloads resume through huggingface_hub (partial files are continued); an archive with a marker is
skipped without downloading its parts; an interrupted extraction restarts the (non-seekable) gzip stream from
the first part but skips members already on disk with the right size, so only the stream is re-read. Parts
deleted before the interruption are downloaded again.

Safety: every member is checked before anything is written: absolute names, ``..`` escaping the target, links
pointing outside it, and device/fifo members are refused with :class:`UnsafeArchiveError`; the tarfile ``'data'``
filter is applied as well when the Python version has it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from faceid.files import write_json_atomic
from faceid.hub import client

log = logging.getLogger(__name__)

DATASETS = {
    "crossfaceid": "Super-shuhe/CrossFaceID",
    "faceid70k": "Super-shuhe/FaceID-70K",
    "faceid6m": "Super-shuhe/FaceID-6M",
}
ALIASES = {"cross-faceid": "crossfaceid", "faceid-70k": "faceid70k", "faceid-6m": "faceid6m"}

RAW_DIR = "raw"
DATA_DIR = "data"
MARKER_DIR = ".extracted"
INDEX_DIR = "index"  # get_face_info writes index/index.jsonl, index/embeddings/, index/rejects.jsonl

_ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
# "<archive>.<suffix>" where suffix is split(1)'s letters (aa, ab, ...) or digits (000, 001 / 00, 01 / 1, 2 ...).
_PART_RE = re.compile(
    r"^(?P<base>.+?(?:\.tar\.gz|\.tgz|\.tar\.bz2|\.tar\.xz|\.tar|\.zip))\.(?P<suf>[a-z]{2,}|\d{1,4})$"
)
_STREAM_MODES = {".tar.gz": "r|gz", ".tgz": "r|gz", ".tar.bz2": "r|bz2", ".tar.xz": "r|xz", ".tar": "r|"}


class UnsafeArchiveError(RuntimeError):
    """An archive member would be written outside the target folder (or is a device); nothing of it is written."""


# --------------------------------------------------------------------------------------------------- archives


def archive_groups(files: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split repository file names into ``{archive name: [part, ...] in order}`` and the other files.

    ``x.tar.gz.aa, x.tar.gz.ab`` → ``{"x.tar.gz": [".aa", ".ab" parts]}``; an unsplit ``y.tar.gz`` is a one-part
    group. Suffixes sort by (length, text), so ``.zz`` < ``.aaa`` and ``.9`` < ``.10`` as split(1) produces them.
    """
    groups: dict[str, list[tuple[tuple[int, str], str]]] = {}
    other = []
    for name in files:
        m = _PART_RE.match(name)
        if m:
            suf = m.group("suf")
            key = (len(suf), suf) if not suf.isdigit() else (0, f"{int(suf):012d}")
            groups.setdefault(m.group("base"), []).append((key, name))
        elif name.lower().endswith(_ARCHIVE_EXTS):
            groups.setdefault(name, []).append(((0, ""), name))
        else:
            other.append(name)
    ordered = {base: [n for _, n in sorted(parts)] for base, parts in sorted(groups.items())}
    for base, parts in ordered.items():
        if base in parts and len(parts) > 1:
            raise ValueError(f"{base}: both the whole archive and split parts are listed: {parts}")
    return ordered, other


class ChainedParts(io.RawIOBase):
    """Read-only, non-seekable file object reading the parts one after another as a single stream.

    ``parts`` are names; ``fetch(name) -> path`` makes each one available just before it is read (download),
    ``on_done(name, path)`` is called once a part has been read to its end (e.g. to delete it).
    """

    def __init__(
        self, parts: Sequence[str], fetch: Callable[[str], str | os.PathLike] = lambda p: p, on_done=None
    ):
        super().__init__()
        self._parts = list(parts)
        self._fetch = fetch
        self._on_done = on_done
        self._index = -1
        self._fh = None
        self._path = None
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def _advance(self) -> bool:
        self._finish_current()
        self._index += 1
        if self._index >= len(self._parts):
            return False
        self._path = os.fspath(self._fetch(self._parts[self._index]))
        self._fh = open(self._path, "rb")  # noqa: SIM115 - closed in _finish_current
        return True

    def _finish_current(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self._on_done is not None:
                self._on_done(self._parts[self._index], self._path)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._fh is None and not self._advance():
                return 0
            n = self._fh.readinto(view)
            if n:
                self.bytes_read += n
                return n
            self._finish_current()

    def drain(self) -> int:
        """Read whatever is left (padding after the tar end marker) so every part gets ``on_done``."""
        n = 0
        buf = bytearray(1 << 20)
        while True:
            k = self.readinto(buf)
            if not k:
                return n
            n += k

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        super().close()


def _is_within(root: str, target: str) -> bool:
    root = os.path.realpath(root)
    target = os.path.realpath(target)
    return target == root or target.startswith(root + os.sep)


def check_member(member: tarfile.TarInfo, dest: str) -> None:
    """Raise :class:`UnsafeArchiveError` unless ``member`` lands (and, for links, points) inside ``dest``."""
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{name!r}: absolute path in archive")
    target = os.path.join(dest, name)
    if not _is_within(dest, target):
        raise UnsafeArchiveError(f"{name!r}: path escapes the target folder")
    if member.issym():
        link = member.linkname
        if os.path.isabs(link) or not _is_within(dest, os.path.join(os.path.dirname(target), link)):
            raise UnsafeArchiveError(f"{name!r}: symlink to {link!r} points outside the target folder")
    elif member.islnk():
        link = member.linkname
        if os.path.isabs(link) or not _is_within(dest, os.path.join(dest, link)):
            raise UnsafeArchiveError(f"{name!r}: hard link to {link!r} points outside the target folder")
    elif member.isdev() or not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{name!r}: device, fifo or unknown member type refused")


def _make_filter(dest: str, stats: dict):
    data_filter = getattr(tarfile, "data_filter", None)

    def _filter(member: tarfile.TarInfo, path: str):
        check_member(member, dest)
        if data_filter is not None:
            try:
                member = data_filter(member, path)
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"{member.name!r}: {exc}") from exc
            if member is None:
                return None
        if member.isfile():
            existing = os.path.join(dest, member.name)
            if (
                os.path.isfile(existing)
                and not os.path.islink(existing)
                and os.path.getsize(existing) == member.size
            ):
                stats["skipped"] += 1
                return None
        stats["members"] += 1
        return member

    return _filter


def extract_stream(fileobj, dest: str | os.PathLike, mode: str = "r|gz", progress=None) -> dict:
    """Extract a tar stream member by member into ``dest`` with the safety checks; returns counts."""
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    stats = {"members": 0, "skipped": 0, "bytes": 0}
    member_filter = _make_filter(dest, stats)
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for member in tar:
            # Existing directories are re-created harmlessly; attribute errors are fatal (errorlevel=1).
            tar.extract(member, dest, filter=member_filter)
            if member.isfile():
                stats["bytes"] += member.size
            if progress is not None:
                progress.update(member.size if member.isfile() else 0)
    return stats


def _extract_zip(path: str, dest: str) -> dict:
    stats = {"members": 0, "skipped": 0, "bytes": 0}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            ti = tarfile.TarInfo(info.filename)
            ti.type = tarfile.DIRTYPE if info.is_dir() else tarfile.REGTYPE
            check_member(ti, dest)
            zf.extract(info, dest)
            stats["members"] += 1
            stats["bytes"] += info.file_size
    return stats


def extract_archive(
    archive: str,
    parts: Sequence[str],
    dest: str | os.PathLike,
    fetch: Callable[[str], str | os.PathLike] = lambda p: p,
    delete_parts: bool = False,
    marker_dir: str | os.PathLike | None = None,
) -> dict:
    """Extract one (possibly split) archive into ``dest``; resumable through a marker file in ``marker_dir``.

    ``parts`` are names in order, ``fetch(name)`` returns a local path for each (downloading it if needed).
    Returns the marker content; an archive whose marker exists is skipped without fetching anything.
    """
    dest = os.fspath(dest)
    marker = Path(marker_dir or os.path.join(dest, MARKER_DIR)) / (Path(archive).name + ".done")
    if marker.exists():
        log.info("%s: already extracted (%s)", archive, marker)
        return json.loads(marker.read_text(encoding="utf-8"))

    def _delete(name, path):
        if delete_parts and os.path.exists(path):
            os.remove(path)

    lower = archive.lower()
    if lower.endswith(".zip"):
        if len(parts) != 1:
            raise ValueError(f"{archive}: split zip archives are not supported")
        path = os.fspath(fetch(parts[0]))
        stats = _extract_zip(path, dest)
        _delete(parts[0], path)
    else:
        mode = next(m for ext, m in _STREAM_MODES.items() if lower.endswith(ext))
        reader = ChainedParts(parts, fetch=fetch, on_done=_delete)
        try:
            buffered = io.BufferedReader(reader, buffer_size=1 << 20)
            stats = extract_stream(buffered, dest, mode=mode)
            reader.drain()  # trailing padding: finishes the last part (and deletes it if asked)
        finally:
            reader.close()
    info = {"archive": archive, "parts": list(parts), **stats}
    write_json_atomic(marker, info)
    return info


# --------------------------------------------------------------------------------------------------- datasets


def resolve_name(name: str) -> str:
    key = name.lower().replace("_", "")
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return key


def download_dataset(
    name: str,
    out_dir: str | os.PathLike,
    repo_id: str | None = None,
    endpoint: str | None = None,
    extract: bool = True,
    build_index: Callable[[list[str]], object] | None = None,
    delete_parts: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download dataset ``name`` (crossfaceid | faceid70k | faceid6m) into ``out_dir``; see the module docstring.

    ``repo_id`` overrides the Hub repository, ``endpoint`` the Hub URL (default: ``$HF_ENDPOINT``, else the Hub).
    With ``extract`` every archive (split or not) is extracted into ``out_dir/data``; ``delete_parts`` removes
    each part once it has been read (parts are then fetched one at a time). ``build_index(argv)``, when given,
    is called with get_face_info.py's command line for ``out_dir/data`` → ``out_dir/index`` (download.py passes
    get_face_info.py's entry point). Returns ``out_dir``.
    """
    key = resolve_name(name)
    repo_id = repo_id or DATASETS[key]
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    out = Path(out_dir)
    raw = out / RAW_DIR
    raw.mkdir(parents=True, exist_ok=True)

    files = client.list_files(repo_id, repo_type="dataset", endpoint=endpoint, revision=revision, token=token)
    archives, other = archive_groups(f for f in files if not f.startswith("."))
    log.info("%s: %d archives, %d other files", repo_id, len(archives), len(other))

    def fetch(filename: str) -> str:
        return os.fspath(
            client.download_file(
                repo_id, filename, raw, endpoint=endpoint, repo_type="dataset", revision=revision, token=token
            )
        )

    for filename in other:
        fetch(filename)
    for archive, parts in archives.items():
        if extract:
            extract_archive(
                archive,
                parts,
                out / DATA_DIR,
                fetch=fetch,
                delete_parts=delete_parts,
                marker_dir=out / MARKER_DIR,
            )
        else:
            for part in parts:
                fetch(part)
    if build_index is not None:
        build_index(get_face_info_argv(out, INDEX_EXTRA_ARGS.get(key, [])))
    return out


# Flags passed to get_face_info.py's dataset mode; kept here so they are easy to adjust.
INDEX_EXTRA_ARGS = {"faceid6m": ["--faceid6m_filters"]}


def get_face_info_argv(out_dir: Path, extra_args: Sequence[str] = ()) -> list[str]:
    return [
        "--input",
        os.fspath(out_dir / DATA_DIR),
        "--output",
        os.fspath(out_dir / INDEX_DIR),
        *extra_args,
    ]


def get_face_info_argv_for(name: str, out_dir: str | os.PathLike) -> list[str]:
    """The get_face_info.py command line that indexes dataset ``name`` downloaded into ``out_dir``."""
    return get_face_info_argv(Path(out_dir), INDEX_EXTRA_ARGS.get(resolve_name(name), []))
