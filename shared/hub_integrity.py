"""Checking Hub downloads against their sha256, and remembering the files that matched.

``huggingface_hub`` checks only a file's size, and re-links whatever its ``blobs/`` folder holds,
so a damaged download would be used for good. After downloading, each file the manifest gives a
sha256 for (shards, the normalization side file; the token table against the Hub's own LFS
sha256, the name of its blob, as the manifest lists none) is hashed once; files that matched are
remembered in ``<repo folder in the HF cache>/crosscache-verified.json`` (by the blob's path,
size, mtime and inode), so later resolves do not hash them again. A file that does not match is
removed (blob and snapshot link) and downloaded once more; if that copy is wrong too,
:class:`HubError` names it.

:func:`_check_downloads` does this for :func:`shared.hub_download.resolve_cache_with_digests`, and
returns the digests it computed (:class:`FreshDigests`), so that ``verify`` of an ``hf://`` cache
need not hash those files again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

from shared.cache_format import TOKENS_NAME, Manifest, ShardRecord
from shared.hub_fetch import _is_offline, _normalization_file, _other_revisions, _snapshot
from shared.hub_spec import REPO_TYPE, HubError, shown_files
from shared.shard_io import atomic_write_bytes
from shared.tokenizer_file import listed_tokenizer_file

VERIFIED_NAME = "crosscache-verified.json"
"""File, inside a repo's folder of the HF cache, listing the downloaded files that matched their sha256."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# sha256 runs at ~1 GB/s per core and releases the GIL: a few threads keep a fast disk busy.
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


class FreshDigests:
    """The sha256 of each downloaded file that one :func:`shared.hub_download.resolve_cache_with_digests` call
    hashed and found equal to the one expected. :meth:`get` gives a digest back only while the file is the one that was
    hashed (same real file, size, mtime and inode), so a caller may skip hashing it again without
    checking less (``verify`` of an ``hf://`` cache, which would otherwise hash every file twice)."""

    def __init__(self) -> None:
        self._by_file: dict[str, tuple[str, tuple[int, int, int]]] = {}

    def add(self, path: str | Path, sha256: str, stat: tuple[int, int, int]) -> None:
        """Record that ``path`` (a snapshot link or a plain file) had ``sha256`` when it had ``stat``."""
        self._by_file[os.path.realpath(path)] = (sha256, stat)

    def get(self, path: str | Path) -> str | None:
        """The sha256 recorded for ``path``, if the file is still the one that was hashed; else None."""
        now = _file_stamp(path)
        if now is None or now[0] not in self._by_file:
            return None
        sha256, stat = self._by_file[now[0]]
        return sha256 if stat == now[1] else None

    def __len__(self) -> int:
        return len(self._by_file)


def _file_stamp(path: str | Path) -> tuple[str, tuple[int, int, int]] | None:
    """The real file behind ``path`` and its (size, mtime_ns, inode): a file replaced or rewritten gets
    another stamp. None when it cannot be read."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real, (st.st_size, st.st_mtime_ns, st.st_ino)


def _blob_entry(path: Path) -> Path | None:
    """The ``blobs/<etag>`` entry a snapshot link points at; None for a plain file (no symlinks here).

    huggingface_hub names a blob by the file's ETag: for LFS files (shards, the token table,
    normalization tensors) the sha256 of the content as the Hub records it, for small git files
    the git blob hash. It checks only the size of what it writes there, never the sha256.
    """
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return Path(target) if os.path.isabs(target) else path.parent / target


def _lfs_sha256(path: Path) -> str | None:
    """The Hub's sha256 of the file ``path`` links to (its blob's name), if it is an LFS file."""
    entry = _blob_entry(path)
    return entry.name if entry is not None and _SHA256_RE.fullmatch(entry.name) else None


def _progress_off() -> bool:
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:
        return False
    return are_progress_bars_disabled()


def _sha256_files(paths: list[Path], desc: str) -> Iterator[str | None]:
    """sha256 of each file in order (None: unreadable), hashed on a few threads, with a progress
    bar once it takes over 2 s. Yields each as it is ready, so an interrupted check keeps those."""
    if not paths:
        return
    from shared.progress import tqdm

    total = 0
    for p in paths:
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    lock = threading.Lock()
    stop = threading.Event()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=2.0, leave=False,
              disable=_progress_off()) as bar:

        def one(path: Path) -> str | None:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        if stop.is_set():  # interrupted: leave the other files unhashed
                            return None
                        digest.update(block)
                        with lock:
                            bar.update(len(block))
            except OSError:
                return None
            return digest.hexdigest()

        pool = ThreadPoolExecutor(min(_HASH_THREADS, len(paths)), thread_name_prefix="crosscache-sha256")
        try:
            yield from pool.map(one, paths)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


class _Verified:
    """``crosscache-verified.json`` of a repo folder: downloaded files that matched their sha256.

    Keyed by the real file's path in the repo folder (a snapshot link's blob, which every commit
    and partial view holding the same content shares), with its size, mtime and inode: a file
    replaced or rewritten since (a new download, an edit) no longer matches its entry.
    """

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir
        self.path = repo_dir / VERIFIED_NAME
        self.changed = False
        try:
            obj = json.loads(self.path.read_text())
        except (OSError, ValueError):
            obj = None
        files = obj.get("files") if isinstance(obj, dict) and obj.get("version") == 1 else None
        self.files: dict[str, dict] = files if isinstance(files, dict) else {}
        self.fresh = FreshDigests()  # what this process hashed and found right

    def _stamp(self, path: Path) -> tuple[str, list[int]] | None:
        found = _file_stamp(path)
        return None if found is None else (os.path.relpath(found[0], self.repo_dir), list(found[1]))

    def check(self, snapshot: Path, expect: dict[str, tuple[str, int | None]], desc: str) -> dict[str, str | None]:
        """Check the files of ``expect`` (relative name -> (sha256, size or None)) not recorded yet.

        Returns the files that fail: name -> their sha256 (None: missing, unreadable or of the
        wrong size). The ones that pass are recorded.
        """
        bad: dict[str, str | None] = {}
        todo: list[tuple[str, Path, tuple[str, list[int]]]] = []
        for rel, (sha256, size) in expect.items():
            path = snapshot / rel
            stamp = self._stamp(path)
            if stamp is None or (size is not None and stamp[1][0] != size):
                bad[rel] = None
            elif self.files.get(stamp[0]) != {"sha256": sha256, "stat": stamp[1]}:
                todo.append((rel, path, stamp))
        # Recorded one by one as hashed: an interrupted check keeps what it finished.
        with closing(_sha256_files([path for _, path, _ in todo], desc)) as digests:
            for (rel, path, stamp), digest in zip(todo, digests):
                if digest != expect[rel][0]:
                    bad[rel] = digest
                elif self._stamp(path) == stamp:  # not replaced while it was hashed
                    self.files[stamp[0]] = {"sha256": digest, "stat": stamp[1]}
                    self.fresh.add(path, digest, (stamp[1][0], stamp[1][1], stamp[1][2]))
                    self.changed = True
        return bad

    def save(self) -> None:
        if not self.changed:
            return
        # Forget files gone since (`hf cache rm`, a repaired download): the record stays small.
        self.files = {k: v for k, v in self.files.items() if (self.repo_dir / k).exists()}
        data = json.dumps({"version": 1, "files": self.files}, indent=0, sort_keys=True).encode()
        try:
            atomic_write_bytes(self.path, data)
        except OSError:  # a read-only cache: nothing is remembered, the files are hashed again next time
            pass


@contextmanager
def _verify_lock(repo_dir: Path) -> Iterator[None]:
    """Hold ``crosscache-verified.json.lock`` while checking: processes resolving the same repo at
    once (the ranks of a distributed run) check and repair its files one at a time, and the ones
    that waited find them recorded instead of hashing them all again."""
    lock = None
    if os.access(repo_dir, os.W_OK):
        try:
            from filelock import FileLock  # a dependency of huggingface_hub

            lock = FileLock(str(repo_dir / f"{VERIFIED_NAME}.lock"))
            lock.acquire()
        except (ImportError, OSError):  # no locking here: check without it
            lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _remove_download(spec: str, path: Path) -> None:
    """Delete a downloaded file: its snapshot link and the blob behind it, which huggingface_hub
    would otherwise link again as it is (it never re-checks a blob it has)."""
    for p in (path, _blob_entry(path)):
        if p is None:
            continue
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise HubError(
                f"{spec}: cannot remove the damaged download {p} ({e}): delete it (or the whole repo, "
                "`hf cache rm`) by hand, or point HF_HUB_CACHE at a cache you can write, and run again"
            ) from None


def _download_again(spec: str, repo: str, commit: str | None, snapshot: Path, files: list[str], *,
                    repo_type: str = REPO_TYPE) -> None:
    """Remove ``files`` from the local Hugging Face cache and download them anew (from a repo of ``repo_type``)."""
    for rel in files:
        _remove_download(spec, snapshot / rel)
    if _is_offline():
        shown = shown_files(files)
        raise HubError(
            f"{spec}: {len(files)} downloaded file(s) in the local Hugging Face cache were damaged (their sha256 "
            f"differs from the expected one) and have been removed: {shown}. Offline mode is on "
            "(HF_HUB_OFFLINE=1): unset it and run the same command again to download them anew."
        )
    _snapshot(spec, repo, commit, [glob.escape(f) for f in files], force=True, repo_type=repo_type)


def _check_downloads(
    spec: str, repo: str, commit: str | None, snapshot: Path, manifest: Manifest, shards: list[ShardRecord]
) -> FreshDigests:
    """Check the downloaded ``shards``, normalization tensors, tokenizer file and token table against their
    sha256; download a damaged file once more, and raise :class:`HubError` if it is still damaged.
    Returns the digests of the files hashed here."""
    expect: dict[str, tuple[str, int | None]] = {s.file: (s.sha256, s.bytes) for s in shards}
    norm_file, norm_sha = _normalization_file(manifest), manifest.normalization.get("sha256")
    if norm_file and norm_sha:
        expect[norm_file] = (str(norm_sha), None)
    tok_file, tok_sha = listed_tokenizer_file(manifest.tokenizer), manifest.tokenizer.get("file_sha256")
    if tok_file and tok_sha:  # listed without a sha256 (another tool's cache): its presence is what counts
        expect[tok_file] = (str(tok_sha), None)
    # The manifest lists no sha256 for the token table: the Hub's own (its blob's name) stands in.
    hub_sha = {rel: _lfs_sha256(snapshot / rel) for rel in [TOKENS_NAME, *expect]}
    if TOKENS_NAME not in expect and hub_sha[TOKENS_NAME]:
        expect[TOKENS_NAME] = (hub_sha[TOKENS_NAME], None)
    repo_dir = snapshot.parents[1]
    with _verify_lock(repo_dir):
        record = _Verified(repo_dir)
        try:
            bad = record.check(snapshot, expect, f"checking {spec}")
            if bad:
                _download_again(spec, repo, commit, snapshot, sorted(bad))
                bad = record.check(snapshot, {rel: expect[rel] for rel in bad}, f"checking {spec}")
        finally:
            record.save()
    if not bad:
        return record.fresh
    details = []
    for rel, actual in sorted(bad.items()):
        want = expect[rel][0]
        if actual is None and not (snapshot / rel).is_file():
            details.append(f"{rel}: removed, and not downloaded again (the Hub may be unreachable)")
        elif actual is None:
            details.append(f"{rel}: of the wrong size for the second download too")
        elif actual == hub_sha.get(rel) and rel != TOKENS_NAME:
            details.append(f"{rel}: the Hub holds a file with sha256 {actual[:12]}... (its own checksum agrees), "
                           f"the manifest lists {want[:12]}...: the repo does not match its manifest")
        else:
            details.append(f"{rel}: sha256 {actual[:12]}..., expected {want[:12]}..., for the second download too")
    raise HubError(
        f"{spec}: {len(bad)} file(s) fail their sha256 check even after downloading them again: "
        + "; ".join(details[:5]) + (f"; and {len(details) - 5} more" if len(details) > 5 else "")
        + ". If the repo does not match its manifest, ask the repo's owner to push the cache again "
        f"(`python run_harvest.py push`), {_other_revisions(repo)}; otherwise the data is damaged on its way "
        "(a proxy, a failing disk): run the same command again later or from another network."
    )
