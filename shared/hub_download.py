"""Downloading Hub caches: :func:`resolve_cache` turns ``hf://USER/NAME[@REV]`` into a local folder.

It downloads through ``huggingface_hub`` into its cache; ``max_shards=N`` fetches only the first
N shards and returns a partial view (below). Import it from :mod:`shared.hub`.

What is fetched: the manifest, the card, the token table, the normalization side file if the
manifest lists one, and the shards the manifest lists; never other files a repo may hold.

Checking downloads: ``huggingface_hub`` checks only a file's size, and re-links whatever its
``blobs/`` folder holds, so a damaged download would be used for good. After downloading,
each file the manifest gives a sha256 for (shards, the normalization side file; the token
table against the Hub's own LFS sha256, the name of its blob, as the manifest lists none) is
hashed once; files that matched are remembered in ``<repo folder in the HF cache>/
crosscache-verified.json`` (by the blob's path, size, mtime and inode), so later resolves do
not hash them again. A file that does not match is removed (blob and snapshot link) and
downloaded once more; if that copy is wrong too, :class:`HubError` names it.

Partial downloads (``max_shards``): the Hub snapshot then lacks most shards its manifest
lists, so :func:`resolve_cache` returns a *view*: a small folder
``<repo folder in the HF cache>/crosscache-partial/<commit>-first<N>/`` holding a manifest that
lists only the first N shards (``n_rows`` corrected, ``partial_of`` recording the repo, commit
and the full ``n_shards`` / ``n_rows``), a card for it, and symlinks (hardlinks or copies where
symlinks are not allowed) to the downloaded token table, normalization tensors and shards.
The view is a complete, verifiable cache; it is rebuilt only if missing or damaged, and
removing the repo from the HF cache (``hf cache rm``) removes it too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

from shared.cache_format import (
    CARD_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_DIR,
    TOKENS_NAME,
    CacheError,
    Manifest,
    ShardRecord,
)
from shared.card import render_card
from shared.hub_spec import (
    _COMMIT_RE,
    REPO_TYPE,
    HubError,
    _network_cause,
    is_hub_spec,
    parse_hub_spec,
    shown_files,
)
from shared.shard_io import atomic_write_bytes
from shared.tokenizer_file import listed_tokenizer_file

PARTIAL_DIR = "crosscache-partial"
"""Folder, inside a repo's folder of the HF cache, that holds partial-download views."""

VERIFIED_NAME = "crosscache-verified.json"
"""File, inside a repo's folder of the HF cache, listing the downloaded files that matched their sha256."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# sha256 runs at ~1 GB/s per core and releases the GIL: a few threads keep a fast disk busy.
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


def resolve_cache(spec: str | Path, *, max_shards: int | None = None) -> Path:
    """A local cache folder for ``spec``: a path as is, or ``hf://USER/NAME[@REV]`` downloaded.

    Downloads go through ``huggingface_hub.snapshot_download`` (repo type ``dataset``) into its
    cache (``HF_HUB_CACHE`` / ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` a copy already there is
    used. Only the manifest, card, token table, the normalization tensors the manifest lists and
    the shards it lists are fetched. ``max_shards=N`` fetches only the first N shards (manifest
    order) and returns a view listing just those (see the module docstring); N >= the shard
    count is the whole cache. Every downloaded file is checked against its sha256 once (see the
    module docstring); a damaged one is downloaded again.

    Raises ``ValueError`` for a bad spec or ``max_shards`` (and for ``max_shards`` with a local
    folder: it limits downloads only), :class:`HubError` when the repo, revision or files
    cannot be had or a file stays damaged, :class:`CacheError` when the repo holds no valid
    manifest.
    """
    return resolve_cache_with_digests(spec, max_shards=max_shards)[0]


class FreshDigests:
    """The sha256 of each downloaded file that one :func:`resolve_cache_with_digests` call hashed and found
    equal to the one expected. :meth:`get` gives a digest back only while the file is the one that was
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


def resolve_cache_with_digests(spec: str | Path, *, max_shards: int | None = None) -> tuple[Path, FreshDigests]:
    """:func:`resolve_cache`, and the digests of the files this call hashed (:class:`FreshDigests`; empty for
    a local folder, or when every file had been checked by an earlier call)."""
    if max_shards is not None and (isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1):
        raise ValueError(f"max_shards must be a whole number >= 1 (or None for all shards), got {max_shards!r}")
    if not is_hub_spec(spec):
        if max_shards is not None:
            raise ValueError(
                f"max_shards={max_shards} applies to Hub caches (hf://USER/NAME) only: it limits what is "
                f"downloaded; {spec} is a local folder and is used whole"
            )
        return Path(spec), FreshDigests()
    spec = str(spec)
    repo, revision = parse_hub_spec(spec)
    first = _snapshot(spec, repo, revision, [MANIFEST_NAME])
    if not (first / MANIFEST_NAME).is_file():
        raise CacheError(
            f"{spec}: the dataset repo {repo} has no {MANIFEST_NAME}: it is not a crosscache cache, or a push to "
            "it has not finished (the manifest goes up last; a push replacing another cache deletes the old one "
            "first); re-run that `run_harvest.py push`"
        )
    # Pin the commit the manifest came from, so a push landing meanwhile cannot mix two caches.
    commit = first.name if _COMMIT_RE.fullmatch(first.name) else revision
    manifest = _hub_manifest(spec, repo, commit, first)
    n_all = len(manifest.shards)
    partial = max_shards is not None and max_shards < n_all
    shards = manifest.shards[:max_shards] if partial else manifest.shards
    norm_file = _normalization_file(manifest)
    tok_file = listed_tokenizer_file(manifest.tokenizer)  # the cache's own tokenizer.json, when it lists one
    side = [TOKENS_NAME] + ([norm_file] if norm_file else []) + ([tok_file] if tok_file else [])
    shard_files = [s.file for s in shards]
    patterns = [glob.escape(f) for f in (MANIFEST_NAME, CARD_NAME, *side)]
    ignore = None
    if partial:
        patterns += [glob.escape(f) for f in shard_files]
    else:
        # A push leaves exactly the manifest's shards under shards/, but a repo may hold more (an
        # upload by other means, a stray): "shards/*" minus the files the manifest does not list.
        shard_patterns = _shard_patterns(shard_files)
        patterns += shard_patterns
        ignore = _unlisted_patterns(repo, commit, shard_patterns, {MANIFEST_NAME, CARD_NAME, *side, *shard_files})
    snapshot = _snapshot(spec, repo, commit, patterns, ignore=ignore)
    needed = side + shard_files
    missing = [f for f in needed if not (snapshot / f).is_file()]
    if missing:
        shown = shown_files(missing)
        raise HubError(
            f"{spec}: {len(missing)} file(s) the manifest needs are neither in the local Hugging Face cache nor "
            f"downloadable: {shown}. {_offline_fix()}"
        )
    fresh = _check_downloads(spec, repo, commit, snapshot, manifest, shards)
    if not partial:
        return snapshot, fresh
    return _partial_view(snapshot, manifest, max_shards, repo, revision), fresh


def _normalization_file(manifest: Manifest) -> str | None:
    """The normalization side file the manifest lists (``mean_std``), or None."""
    name = manifest.normalization.get("file")
    return str(name) if name else None


def _shard_patterns(files: list[str]) -> list[str]:
    """Patterns for ``files`` (all of a cache's shards): ``shards/*`` where they all live there.

    huggingface_hub tests every file against every pattern, so thousands of exact names would
    cost millions of matches; callers exclude unlisted files separately where it matters.
    """
    if all(f.startswith(f"{SHARD_DIR}/") for f in files):
        return [f"{SHARD_DIR}/*"]
    return [glob.escape(f) for f in files]


def _unlisted_patterns(repo: str, commit: str | None, shard_patterns: list[str], wanted: set[str]) -> list[str] | None:
    """``ignore_patterns`` for the files under ``shards/`` that the manifest does not list.

    Only needed where ``shard_patterns`` is the ``shards/*`` glob; None when there are none, or
    when the repo's file list cannot be had (then ``shards/*`` alone is used, as before).
    """
    if shard_patterns != [f"{SHARD_DIR}/*"] or commit is None:
        return None
    files = _repo_files(repo, commit)
    if files is None:
        return None
    unlisted = [glob.escape(f) for f in files if f.startswith(f"{SHARD_DIR}/") and f not in wanted]
    return unlisted or None


def _repo_files(repo: str, commit: str) -> list[str] | None:
    """The repo's files at ``commit``: the listing ``snapshot_download`` keeps on disk (huggingface_hub
    2.x; it lists the whole repo even for one file), else asked of the Hub; None if neither answers."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # huggingface_hub 1.x: no listing on disk
        pass
    else:
        try:
            return [f.path for f in get_cached_repo_tree(repo, repo_type=REPO_TYPE, revision=commit)]
        except CachedRepoTreeNotFoundError:
            pass
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():  # offline nothing is downloaded, so nothing unlisted either
        return None
    try:
        return list(HfApi().list_repo_files(repo, repo_type=REPO_TYPE, revision=commit))
    except Exception:  # noqa: BLE001 - only an optimisation: the download that follows reports real errors
        return None


def _offline_fix() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return (
            "Offline mode is on (HF_HUB_OFFLINE=1): unset it to download, or point HF_HUB_CACHE (or HF_HOME) "
            f"at a Hugging Face cache that holds the files (now {constants.HF_HUB_CACHE})."
        )
    # huggingface_hub keeps each finished file, but writes a download to a temporary file that it
    # deletes when the download fails: a file cut off mid-way starts from zero on the next run.
    return (
        f"Check your connection to {constants.ENDPOINT} and run the same command again: files already "
        "downloaded are kept, a file cut off mid-way is downloaded again from its start."
    )


def _is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextmanager
def _hub_errors(spec: str, repo: str, revision: str | None) -> Iterator[None]:
    """Turn what ``huggingface_hub`` raises into :class:`HubError` (a message naming the fix)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    try:
        yield
    except RevisionNotFoundError:
        raise HubError(
            f"{spec}: revision {revision!r} not found in dataset repo {repo}; see its branches and tags at "
            f"https://huggingface.co/datasets/{repo}/tree/main, or drop @{revision} for the main branch"
        ) from None
    except RepositoryNotFoundError:  # also gated repos
        raise HubError(
            f"{spec}: dataset repo {repo} not found on the Hub, or it is private/gated and no token with access "
            "was found. Check the name (caches are *dataset* repos) and log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:  # offline (or unreachable) and no (complete) copy cached
        raise HubError(
            f"{spec}: cannot download {repo}{at}: the Hub cannot be reached and the local Hugging Face cache "
            f"has no complete copy of it. {_offline_fix()}"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 429 or (isinstance(status, int) and status >= 500):  # busy or down: worth a retry
            raise HubError(
                f"{spec}: the Hub could not serve {repo}{at} right now (HTTP {status}). {_offline_fix()}"
            ) from None
        raise HubError(f"{spec}: the Hub refused the download ({type(e).__name__}: {e})") from None
    except Exception as e:
        cause = _network_cause(e)
        if cause is None:
            raise
        detail = str(cause) if len(str(cause)) <= 200 else str(cause)[:200] + "..."
        raise HubError(
            f"{spec}: downloading {repo}{at} failed: the Hub could not be reached or the connection to it was "
            f"lost ({type(cause).__name__}: {detail}). {_offline_fix()}"
        ) from None


def _snapshot(
    spec: str,
    repo: str,
    revision: str | None,
    patterns: list[str],
    *,
    ignore: list[str] | None = None,
    force: bool = False,
) -> Path:
    """``snapshot_download`` of ``patterns`` (less ``ignore``; ``force``: fetch again even if cached),
    with its errors turned into :class:`HubError`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec}: Hub caches need huggingface_hub (pip install huggingface_hub)") from None
    with _hub_errors(spec, repo, revision):
        return Path(snapshot_download(repo, repo_type=REPO_TYPE, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=ignore, force_download=force))


# --------------------------------------------------------------------------------------------
# the manifest of someone else's cache


def _other_revisions(repo: str, holding: str = "") -> str:
    return (f"or use another revision{holding} (hf://{repo}@REVISION; its branches and tags: "
            f"https://huggingface.co/datasets/{repo}/tree/main)")


def _hub_manifest(spec: str, repo: str, commit: str | None, folder: Path) -> Manifest:
    """The repo's manifest, read from ``folder`` (its snapshot), with errors that name ``spec``.

    The cache is someone else's: the advice is to upgrade crosscache, ask the repo's owner or use
    another revision, not to re-harvest. A manifest that does not read is downloaded once more
    first: the damage may be in the local copy only.
    """
    refetched = False
    while True:
        try:
            obj = json.loads((folder / MANIFEST_NAME).read_bytes())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            problem = f"it is not valid JSON ({e})"
        else:
            version = obj.get("format_version") if isinstance(obj, dict) else None
            if version is not None and version != FORMAT_VERSION:
                raise CacheError(_format_message(spec, repo, version))
            try:
                return Manifest.from_json(obj, where=MANIFEST_NAME)
            except CacheError as e:
                problem = str(e)
        if refetched or _is_offline():
            break
        _download_again(spec, repo, commit, folder, [MANIFEST_NAME])
        refetched = True
    at = f" (commit {commit})" if commit else ""
    if refetched:
        where = "a fresh download of it is no better, so the copy on the Hub is damaged"
    else:  # offline: the local copy may be what is damaged
        where = ("if only the local copy is damaged, run again without HF_HUB_OFFLINE=1 to download it anew; "
                 "otherwise the copy on the Hub is damaged")
    raise CacheError(
        f"{spec}: the repo's {MANIFEST_NAME}{at} is not a valid crosscache manifest: {problem}. {where}: ask the "
        f"repo's owner to push the cache again (`python run_harvest.py push`), {_other_revisions(repo)}"
    )


def _format_message(spec: str, repo: str, version: object) -> str:
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return (
            f"{spec}: this cache is in format v{version}, newer than this crosscache reads (v{FORMAT_VERSION}): "
            f"upgrade crosscache to read it, {_other_revisions(repo, f' that holds a v{FORMAT_VERSION} cache')}"
        )
    return (
        f"{spec}: this cache's manifest has format_version {version!r}, which this crosscache does not read (it "
        f"reads v{FORMAT_VERSION}): ask the repo's owner to push it in format v{FORMAT_VERSION}, "
        f"{_other_revisions(repo)}"
    )


# --------------------------------------------------------------------------------------------
# checking downloads against their sha256


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
    from tqdm import tqdm

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


def _download_again(spec: str, repo: str, commit: str | None, snapshot: Path, files: list[str]) -> None:
    """Remove ``files`` from the local Hugging Face cache and download them anew."""
    for rel in files:
        _remove_download(spec, snapshot / rel)
    if _is_offline():
        shown = shown_files(files)
        raise HubError(
            f"{spec}: {len(files)} downloaded file(s) in the local Hugging Face cache were damaged (their sha256 "
            f"differs from the expected one) and have been removed: {shown}. Offline mode is on "
            "(HF_HUB_OFFLINE=1): unset it and run the same command again to download them anew."
        )
    _snapshot(spec, repo, commit, [glob.escape(f) for f in files], force=True)


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


# --------------------------------------------------------------------------------------------
# partial views


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target``'s real file: a relative symlink, else a hardlink, else a copy."""
    real = Path(os.path.realpath(target))
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(real, link.parent))
    except OSError:
        try:
            os.link(real, link)
        except OSError:
            shutil.copyfile(real, link)


def _view_ok(view: Path, manifest_bytes: bytes, files: list[str], snapshot: Path) -> bool:
    try:
        same = (view / MANIFEST_NAME).read_bytes() == manifest_bytes
    except OSError:
        return False
    for rel in files:
        link = view / rel
        if not link.is_file():
            return False
        # A link must still reach the snapshot's file: a repaired download may live elsewhere now.
        if link.is_symlink() and os.path.realpath(link) != os.path.realpath(snapshot / rel):
            return False
    return same


def _partial_view(snapshot: Path, manifest: Manifest, n: int, repo: str, revision: str | None) -> Path:
    """A cache folder listing the first ``n`` shards of ``snapshot`` (see the module docstring)."""
    commit = snapshot.name
    view = snapshot.parents[1] / PARTIAL_DIR / f"{commit}-first{n}"
    picked = manifest.shards[:n]
    obj = manifest.to_json()
    obj["shards"] = [s.to_json() for s in picked]
    obj["n_rows"] = sum(s.n_rows for s in picked)
    obj["partial_of"] = {
        "repo": repo,
        "revision": revision,
        "commit": commit,
        "n_shards": len(manifest.shards),
        "n_rows": manifest.n_rows,
    }
    data = json.dumps(obj, indent=1).encode() + b"\n"
    files = [TOKENS_NAME] + [s.file for s in picked]
    norm_file = _normalization_file(manifest)
    if norm_file:
        files.append(norm_file)
    tok_file = listed_tokenizer_file(manifest.tokenizer)
    if tok_file:
        files.append(tok_file)
    if _view_ok(view, data, files, snapshot):
        return view
    # Build beside the final name, then rename: readers never see a half-built view.
    tmp = view.with_name(f".{view.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in files:
        _link(snapshot / rel, tmp / rel)
    (tmp / MANIFEST_NAME).write_bytes(data)
    (tmp / CARD_NAME).write_text(render_card(Manifest.from_json(obj)))
    if view.exists():  # damaged (a link to a deleted blob): its content is deterministic, rebuild it
        shutil.rmtree(view, ignore_errors=True)
    try:
        os.rename(tmp, view)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not _view_ok(view, data, files, snapshot):
            raise HubError(f"could not build the partial view {view} of {repo}; remove it and run again") from None
    return view
