"""Where WebDataset shards live: local paths, ``http(s)://`` URLs, ``pipe:COMMAND`` (the command writes the tar to
stdout, e.g. ``pipe:aws s3 cp s3://bucket/shard-000000.tar -``) and any fsspec URL (``s3://`` with ``s3fs``,
``gs://`` with ``gcsfs``; fsspec and those packages are optional). Brace ranges (``shard-{000000..000335}.tar``)
expand to one location per shard.

A remote shard is read as a stream (``tarfile`` mode ``'r|'``), never downloaded whole; ``shard_streams.py``
retries a failed read and then names the shard. The converter uploads with :func:`upload`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

from faceid.train.errors import TrainingInputError

MANIFEST = "shards.json"
FORMAT = "instantid-wds-1"
TIMEOUT = 60.0  # seconds without a byte before an HTTP read fails (and is retried)
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TAR_TOKEN = re.compile(r"[^/\s'\"]*\.tar\b")  # the shard file name inside a URL or a pipe: command


class ShardReadError(TrainingInputError):
    """A shard (or the shard list) could not be read; the message names it."""

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, torch re-raises it with the worker's traceback as the message; the
        # user needs the last line (what failed, what to do), not the traceback.
        if message.startswith("Caught ShardReadError") and "ShardReadError: " in message:
            message = message.rsplit("ShardReadError: ", 1)[1].strip()
        super().__init__(message)


def expand_braces(spec: str) -> list[str]:
    """``a-{00..02}.tar`` → ``[a-00.tar, a-01.tar, a-02.tar]``; several ranges give their product; the width of
    the first bound is kept (zero padding)."""
    parts = _BRACE.split(spec)
    if len(parts) == 1:
        return [spec]
    ranges = []
    for lo, hi in zip(parts[1::3], parts[2::3]):
        if int(hi) < int(lo):
            raise TrainingInputError(f"{spec}: empty range {{{lo}..{hi}}}")
        ranges.append([f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)])
    out = []
    for combo in itertools.product(*ranges):
        text = parts[0]
        for value, tail in zip(combo, parts[3::3]):
            text += value + tail
        out.append(text)
    return out


def is_remote(loc: str) -> bool:
    """True for ``pipe:`` commands and URLs (``scheme://``); local paths (and ``file://``) read randomly."""
    loc = str(loc)
    return loc.startswith("pipe:") or ("://" in loc and not loc.startswith("file://"))


def local_path(loc: str) -> str:
    loc = str(loc)
    return loc[len("file://") :] if loc.startswith("file://") else loc


def exists_or_remote(loc: str) -> bool:
    """What a flag check can test up front: a remote source or brace range is checked when it is read."""
    loc = str(loc)
    return is_remote(loc) or bool(_BRACE.search(loc)) or os.path.exists(local_path(loc))


def _fsspec_open(url: str):
    try:
        import fsspec
    except ImportError as e:
        raise ShardReadError(
            f"{url}: reading {url.split('://')[0]}:// needs fsspec (pip install fsspec, plus s3fs for s3://, "
            "gcsfs for gs://), or give the shards as pipe:COMMAND or http(s)://"
        ) from e
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as e:  # fsspec is there but not the protocol's package
        raise ShardReadError(f"{url}: {e} (pip install s3fs for s3://, gcsfs for gs://)") from e


class _PipeStream(io.RawIOBase):
    """stdout of ``COMMAND`` as a stream; closing after EOF checks the exit status (a failed download is an
    error, not a short shard), closing before EOF stops the command."""

    def __init__(self, loc: str):
        self.loc, self.eof = loc, False
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on stderr
        self.proc = subprocess.Popen(loc[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=self.err)

    def readable(self):
        return True

    def readinto(self, b):
        n = self.proc.stdout.readinto(b)
        self.eof = self.eof or n == 0
        return n

    def close(self):
        if self.closed:
            return
        if not self.eof:
            self.proc.kill()
        self.proc.stdout.close()
        code = self.proc.wait()
        self.err.seek(0)
        tail = self.err.read()[-500:].decode("utf-8", "replace").strip()
        self.err.close()
        super().close()
        if self.eof and code != 0:
            raise ShardReadError(f"{self.loc}: command exited with status {code}: {tail}")


@contextlib.contextmanager
def open_stream(loc: str, timeout: float = TIMEOUT):
    """A binary stream over the bytes at ``loc`` (local path, URL or ``pipe:``)."""
    loc = str(loc)
    if loc.startswith("pipe:"):
        raw = _PipeStream(loc)
        stream = io.BufferedReader(raw, 1 << 20)
    elif loc.startswith(("http://", "https://")):
        stream = urllib.request.urlopen(loc, timeout=timeout)  # noqa: S310 - http(s) only, checked above
    elif is_remote(loc):
        stream = _fsspec_open(loc)
    else:
        stream = open(local_path(loc), "rb")
    try:
        yield stream
    finally:
        stream.close()


def permanent(error: BaseException) -> bool:
    """Errors a retry cannot fix (404, 403, …): not retried."""
    return (
        isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429)
    ) or isinstance(error, FileNotFoundError)


def read_bytes(loc: str, timeout: float = TIMEOUT) -> bytes:
    try:
        with open_stream(loc, timeout) as f:
            return f.read()
    except ShardReadError:
        raise
    except (OSError, ValueError) as e:
        raise ShardReadError(f"{loc}: cannot read ({e})") from e


def join(base: str, name: str) -> str:
    """``name`` (a manifest entry) next to the manifest at ``base``."""
    if is_remote(base):
        return base.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(local_path(base)), name)


def resolve(spec: str) -> tuple[str, dict, list[tuple[str, dict]]]:
    """``--train_shards`` → (manifest location, manifest, [(shard location, manifest entry)]).

    * a folder, ``shards.json`` path or URL (``http://host/shards/``, ``s3://b/shards/shards.json``): every shard
      of the manifest, found next to it;
    * a shard list (``.../shard-{000000..000099}.tar``, ``pipe:... shard-{000000..000099}.tar ...``): those shards,
      with counts from the ``shards.json`` next to them (for ``pipe:``, the same command with the shard name
      replaced by ``shards.json``)."""
    spec = str(spec)
    listed = bool(_TAR_TOKEN.search(spec))
    if listed:
        manifest_loc = _TAR_TOKEN.sub(MANIFEST, spec, count=1)
    elif spec.startswith("pipe:") or spec.endswith(".json"):
        manifest_loc = spec
    elif is_remote(spec):
        manifest_loc = spec.rstrip("/") + "/" + MANIFEST
    else:
        manifest_loc = os.path.join(local_path(spec), MANIFEST)
    try:
        manifest = json.loads(read_bytes(manifest_loc))
    except json.JSONDecodeError as e:
        raise ShardReadError(f"{manifest_loc}: not a shard manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardReadError(f"{manifest_loc}: not an InstantID shard manifest")
    if not listed:
        if spec.startswith("pipe:"):
            raise ShardReadError(
                f"{spec}: a pipe: manifest cannot name its shards; give the shard list, e.g. "
                "'pipe:aws s3 cp s3://bucket/shards/shard-{000000..000099}.tar -'"
            )
        return manifest_loc, manifest, [(join(manifest_loc, e["file"]), e) for e in manifest["shards"]]
    by_name = {e["file"]: e for e in manifest["shards"]}
    pairs = []
    for loc in expand_braces(spec):
        name = _TAR_TOKEN.search(loc).group(0)
        if name not in by_name:
            raise ShardReadError(f"{loc}: {name} is not in {manifest_loc}")
        pairs.append((loc, by_name[name]))
    return manifest_loc, manifest, pairs


def upload_command(command: str, local_file: str) -> None:
    """Run ``command`` (``{}`` = the shard's file name) with the shard on stdin: ``aws s3 cp - s3://b/s/{}``."""
    name = os.path.basename(local_file)
    with open(local_file, "rb") as f:
        done = subprocess.run(command.replace("{}", name), shell=True, stdin=f, capture_output=True)
    if done.returncode != 0:
        raise ShardReadError(
            f"{local_file}: upload command exited with status {done.returncode}: "
            f"{done.stderr.decode('utf-8', 'replace')[-500:].strip()}"
        )


def upload(dest: str, local_file: str) -> None:
    """Copy a finished shard to ``dest`` (``pipe:COMMAND`` with ``{}``, or an fsspec folder URL)."""
    if dest.startswith("pipe:"):
        return upload_command(dest[len("pipe:") :], local_file)
    try:
        import fsspec
    except ImportError as e:
        raise ShardReadError(f"{dest}: uploading needs fsspec (or give --upload 'pipe:COMMAND {{}}')") from e
    with (
        open(local_file, "rb") as src,
        fsspec.open(dest.rstrip("/") + "/" + os.path.basename(local_file), "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike, sent: list | None = None):
    """``http://127.0.0.1:PORT`` serving ``folder`` from a thread (tests, benchmarks, a quick trial of remote
    shards); localhost only, stopped on exit. ``sent``: a one-item list that counts the bytes served."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):
            while chunk := source.read(1 << 16):
                # Counted before it is written: once a reader has a whole response, the count has it too (a count
                # made after the write raced the reader's next step); a chunk whose write fails is taken back.
                count(len(chunk))
                try:
                    outputfile.write(chunk)
                except BaseException:
                    count(-len(chunk))
                    raise

    lock = threading.Lock()  # one handler thread per connection

    def count(n: int) -> None:
        if sent is not None:
            with lock:
                sent[0] += n

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            if not isinstance(
                sys.exc_info()[1], (ConnectionError, BrokenPipeError)
            ):  # a reader that stops early
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
