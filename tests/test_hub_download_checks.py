"""Checks on ``hf://`` downloads (shared/hub_download.py): sha256, lost connections, foreign manifests, strays.

Nothing here reaches the real Hub. Offline tests populate a Hugging Face cache folder the way
tests/test_hub.py does (``publish``). The others run the real ``huggingface_hub`` download code
against :class:`FakeHub`, a small HTTP server on 127.0.0.1 that answers the requests
``snapshot_download`` makes for a dataset repo (revision info, the recursive file tree, ``HEAD``
and ``GET`` of ``/resolve/``) the way the Hub does: LFS files (shards, token table,
normalization tensors) carry their sha256 as ``X-Linked-Etag``, small files their git blob hash
as ``ETag``. It can serve damaged bytes, drop a connection mid-file, and counts every ``GET``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import shared.hub_integrity as hi
import tests.test_hub as _test_hub
from conftest import serve_as_hub
from shared.cache import open_cache, verify_cache
from shared.cache_format import CacheError, Manifest
from shared.card import render_card
from shared.hub import HubError, resolve_cache
from tests.test_hub import COMMIT_A, _cache, publish

REPO = "alice/toy-diff"
SPEC = f"hf://{REPO}"
SHARDS = [f"shards/acts-{i:05d}.safetensors" for i in range(4)]
LFS_SUFFIXES = (".safetensors", ".arrow", ".bin")

hf_home = _test_hub.hf_home  # the fixture: an empty, offline Hugging Face cache in tmp_path


# --------------------------------------------------------------------------------------------
# a stand-in for the Hub


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Dataset repos served over HTTP as the Hub serves them (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # repo -> (commit, files)
        self.in_transit: dict[str, bytes] = {}  # path -> bytes sent instead of the file (its ETag unchanged)
        self.drop: set[str] = set()  # paths whose GET is cut off mid-way
        self.gets: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, repo: str, files: dict[str, bytes], commit: str = COMMIT_A) -> None:
        self.repos[repo] = (commit, dict(files))

    def tree(self, repo: str) -> list[dict]:
        entries = []
        for path, data in sorted(self.repos[repo][1].items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, body: bool) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/(.+)", path):
            commit, _ = hub.repos[m[1]]
            return self._json({"id": m[1], "sha": commit, "private": False})
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)", path):
            return self._json(hub.tree(m[1]))
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None or m[1] not in hub.repos or m[3] not in hub.repos[m[1]][1]:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        commit, files = hub.repos[m[1]]
        rel, data = m[3], files[m[3]]
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        if rel.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{sha}"')
        else:
            self.send_header("ETag", f'"{_git_blob_sha1(data)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return None
        with hub.lock:
            hub.gets[rel] += 1
        if rel in hub.drop:
            # Half the file (none on a retry), then the connection ends: "peer closed connection".
            if "Range" not in self.headers:
                self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return None
        self.wfile.write(hub.in_transit.get(rel, data))
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@pytest.fixture
def fake_hub(hf_home, monkeypatch):
    """A :class:`FakeHub` that ``huggingface_hub`` (online mode) downloads from, into ``hf_home``."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hub = FakeHub()
    serve_as_hub(server, monkeypatch)
    yield server.hub
    server.shutdown()
    server.server_close()


def _hub_files(src: Path, repo: str = REPO) -> dict[str, bytes]:
    """What a push of ``src`` leaves in a repo: data files the manifest lists, manifest, card."""
    man = Manifest.load(src)
    names = ["tokens.arrow"] + [s.file for s in man.shards]
    if man.normalization.get("file"):
        names.append(man.normalization["file"])
    if man.tokenizer.get("file"):
        names.append(man.tokenizer["file"])
    files = {n: (src / n).read_bytes() for n in names}
    files["manifest.json"] = (src / "manifest.json").read_bytes()
    files["README.md"] = render_card(man, hub_repo=repo).encode()
    return files


def _flip_bit(path: Path, offset: int = -3) -> None:
    """Flip one bit of ``path``'s real file in place (size unchanged), dated a second later as a
    change made some time after the download would be."""
    real = Path(os.path.realpath(path))
    data = bytearray(real.read_bytes())
    data[offset] ^= 0x10
    real.write_bytes(bytes(data))
    st = real.stat()
    os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _repo_dir(hf_home: Path, repo: str = REPO) -> Path:
    return hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"


def _snap(hf_home: Path) -> Path:
    return _repo_dir(hf_home) / "snapshots" / COMMIT_A


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the files :mod:`shared.hub_integrity` hashes (relative to their snapshot)."""
    seen: list[str] = []
    real = hi._sha256_files  # raises if the hashing moved: the spy must patch where it is looked up

    def spy(paths, desc):
        seen.extend("/".join(Path(p).parts[-2:]) if Path(p).parent.name == "shards" else Path(p).name for p in paths)
        return real(paths, desc)

    monkeypatch.setattr(hi, "_sha256_files", spy)
    return seen


# --------------------------------------------------------------------------------------------
# 1. downloaded files are checked against their sha256, once; damaged ones are fetched again


@pytest.mark.parametrize("damaged", ["shards/acts-00001.safetensors", "normalization.safetensors", "tokens.arrow"])
def test_a_damaged_download_is_found_and_downloaded_again(tmp_path, hf_home, fake_hub, hashed, damaged):
    src = _cache(tmp_path / "c", mean_std=True)
    fake_hub.add(REPO, _hub_files(src))
    snap = resolve_cache(SPEC)
    assert snap == _snap(hf_home)
    first_check = sorted(hashed)

    # One bit flips in the blob huggingface_hub keeps (a bad disk, an interrupted copy...). The
    # snapshot link points at it: a plain re-run of huggingface_hub would use it as it is.
    _flip_bit(snap / damaged)
    assert (snap / damaged).read_bytes() != (src / damaged).read_bytes()
    hashed.clear()
    assert resolve_cache(SPEC) == snap
    assert (snap / damaged).read_bytes() == (src / damaged).read_bytes()  # repaired
    assert fake_hub.gets[damaged] == 2  # downloaded once more, the others not
    assert all(n == 1 for f, n in fake_hub.gets.items() if f != damaged), fake_hub.gets
    assert verify_cache(snap).ok
    assert open_cache(SPEC).manifest.n_rows == Manifest.load(src).n_rows
    # Every file with a known sha256 was hashed after the first download; after that only the
    # changed one, before and after its new download.
    assert first_check == sorted(SHARDS + ["normalization.safetensors", "tokens.arrow"])
    assert hashed == [damaged, damaged]


def test_checked_files_are_remembered_not_hashed_again(tmp_path, hf_home, fake_hub, hashed):
    src = _cache(tmp_path / "c")
    fake_hub.add(REPO, _hub_files(src))
    view = resolve_cache(SPEC, max_shards=2)
    assert sorted(hashed) == sorted(SHARDS[:2] + ["tokens.arrow"])
    hashed.clear()
    resolve_cache(SPEC, max_shards=2)
    snap = resolve_cache(SPEC)  # the whole cache: only the two shards not checked yet
    assert sorted(hashed) == sorted(SHARDS[2:])
    hashed.clear()
    assert open_cache(SPEC).dir == snap and resolve_cache(SPEC, max_shards=3).parent == view.parent
    assert hashed == []
    record = json.loads((_repo_dir(hf_home) / "crosscache-verified.json").read_text())
    # Keyed by blob (content): a file is checked once whichever commit or view holds it.
    assert all(key.startswith("blobs/") for key in record["files"]) and len(record["files"]) == 5
    # A file rewritten since (new mtime) is hashed again; an intact one passes.
    real = Path(os.path.realpath(snap / SHARDS[3]))
    st = real.stat()
    os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    resolve_cache(SPEC)
    assert hashed == [SHARDS[3]] and fake_hub.gets[SHARDS[3]] == 1


def test_an_interrupted_check_keeps_what_it_finished(tmp_path, hf_home, monkeypatch):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", REPO, src, COMMIT_A)
    real = hi._sha256_files  # raises if the hashing moved: the spy must patch where it is looked up

    def interrupted(paths, desc):
        digests = real(paths, desc)
        yield next(digests)
        digests.close()
        raise KeyboardInterrupt  # Ctrl-C while the second file is hashed

    monkeypatch.setattr(hi, "_sha256_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_cache(SPEC)
    record = json.loads((_repo_dir(hf_home) / "crosscache-verified.json").read_text())
    assert len(record["files"]) == 1


def test_data_damaged_in_transit_fails_after_one_new_download(tmp_path, hf_home, fake_hub):
    src = _cache(tmp_path / "c")
    fake_hub.add(REPO, _hub_files(src))
    bad = bytearray((src / SHARDS[2]).read_bytes())
    bad[-5] ^= 0x01
    fake_hub.in_transit[SHARDS[2]] = bytes(bad)  # same size, same ETag: only a sha256 tells
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert "shards/acts-00002.safetensors" in msg and "second download" in msg and "run the same command again" in msg
    assert fake_hub.gets[SHARDS[2]] == 2  # fetched again exactly once
    # Nothing was recorded as checked for it: a later run checks it again.
    record = json.loads((_repo_dir(hf_home) / "crosscache-verified.json").read_text())
    assert len(record["files"]) == 4  # 3 good shards + tokens.arrow
    with pytest.raises(HubError, match="acts-00002"):
        open_cache(SPEC, max_shards=3)


def test_a_repo_that_does_not_match_its_manifest_says_so(tmp_path, hf_home, fake_hub):
    src = _cache(tmp_path / "c")
    files = _hub_files(src)
    other = bytearray(files[SHARDS[0]])
    other[-2] ^= 0x04
    files[SHARDS[0]] = bytes(other)  # the Hub's own record (LFS sha256) agrees with these bytes
    fake_hub.add(REPO, files)
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert "shards/acts-00000.safetensors" in msg and "does not match its manifest" in msg
    assert "push the cache again" in msg and f"hf://{REPO}@REVISION" in msg
    assert fake_hub.gets[SHARDS[0]] == 2


@pytest.mark.parametrize("lost", [SHARDS[2], "tokens.arrow"])
def test_a_file_the_repo_lacks_is_the_repos_fault_not_the_connections(tmp_path, hf_home, fake_hub, lost):
    """A repo whose manifest lists a file it does not hold said to check the connection and run again,
    which never helps."""
    files = _hub_files(_cache(tmp_path / "c"))
    del files[lost]
    fake_hub.add(REPO, files)
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert f"lacks 1 file(s) its manifest lists: {lost}" in msg and "ask the repo's owner to push it again" in msg
    assert "connection" not in msg and f"hf://{REPO}@REVISION" in msg


def test_offline_a_damaged_download_is_reported_and_removed(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", REPO, src, COMMIT_A)
    snap = _snap(hf_home)
    blob = Path(os.path.realpath(snap / SHARDS[1]))
    _flip_bit(snap / SHARDS[1])
    with pytest.raises(HubError) as info:
        open_cache(SPEC)
    msg = str(info.value)
    assert "shards/acts-00001.safetensors" in msg and "HF_HUB_OFFLINE=1" in msg and "removed" in msg
    # Both the snapshot link and the blob are gone: huggingface_hub cannot link the damaged blob again.
    assert not blob.exists() and not os.path.lexists(snap / SHARDS[1])
    report = verify_cache(SPEC)
    assert not report.ok and "acts-00001" in report.problems[0]


def test_offline_the_token_table_is_checked_against_the_hubs_sha256(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", REPO, src, COMMIT_A)  # blobs named by sha256, as for LFS files
    assert resolve_cache(SPEC, max_shards=1)
    _flip_bit(_snap(hf_home) / "tokens.arrow", offset=len((src / "tokens.arrow").read_bytes()) // 2)
    with pytest.raises(HubError, match=r"tokens\.arrow"):
        resolve_cache(SPEC, max_shards=1)


# --------------------------------------------------------------------------------------------
# 2. a connection lost mid-download is a HubError that says to run again


def test_connection_lost_mid_download_is_a_hub_error_and_a_rerun_finishes(tmp_path, hf_home, fake_hub):
    src = _cache(tmp_path / "c")
    fake_hub.add(REPO, _hub_files(src))
    fake_hub.drop.add(SHARDS[3])
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert msg.startswith(SPEC) and "could not be reached or the connection to it was lost" in msg
    assert "run the same command again" in msg and "resume" not in msg
    assert "RemoteProtocolError" in msg or "ConnectError" in msg
    done = {f: n for f, n in fake_hub.gets.items() if f != SHARDS[3]}
    fake_hub.drop.clear()
    snap = resolve_cache(SPEC)
    assert verify_cache(snap).ok
    # Finished files were kept; the cut-off one started again from its start (a GET without Range).
    assert {f: n for f, n in fake_hub.gets.items() if f != SHARDS[3]} == done


@pytest.mark.parametrize("make_error", [
    lambda: __import__("httpx").ConnectError("[Errno 111] Connection refused"),
    lambda: __import__("httpx").RemoteProtocolError("peer closed connection without sending complete message body"),
    lambda: __import__("httpx2").ReadTimeout("The read operation timed out"),
    lambda: __import__("requests").exceptions.ConnectionError("Connection aborted."),
    lambda: __import__("urllib3").exceptions.ProtocolError("Connection broken: IncompleteRead"),
    lambda: ConnectionResetError(104, "Connection reset by peer"),
    lambda: OSError("Consistency check failed: file should be of size 10 but has size 5 (acts-00000.safetensors)."),
], ids=["httpx-connect", "httpx-peer-closed", "httpx2-timeout", "requests", "urllib3", "reset", "hf-consistency"])
def test_network_errors_of_every_http_stack_become_hub_errors(hf_home, monkeypatch, make_error):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fail(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert msg.startswith(f"{SPEC}: downloading {REPO} failed: the Hub could not be reached")
    assert "run the same command again" in msg and "resume" not in msg


def test_huggingface_hubs_wrapped_errors_and_real_bugs(hf_home, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    errors = []

    def fail(*args, **kwargs):
        raise errors.pop(0)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    # A forced download whose request failed: huggingface_hub raises ValueError from the network error.
    try:
        raise httpx2.ConnectError("Connection refused")
    except httpx2.ConnectError as net:
        wrapped = ValueError("Force download failed due to the above error.")
        wrapped.__cause__ = net
    errors.append(wrapped)
    with pytest.raises(HubError, match="could not be reached.*ConnectError"):
        resolve_cache(SPEC)
    # Online, nothing cached: the advice no longer promises that downloads resume.
    errors.append(LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"))
    with pytest.raises(HubError) as info:
        resolve_cache(SPEC)
    assert "run the same command again" in str(info.value) and "resume" not in str(info.value)
    # Anything else is a bug to see, not a connection problem.
    errors.append(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        resolve_cache(SPEC)


# --------------------------------------------------------------------------------------------
# 3. a manifest that cannot be read: name the hf:// spec, advice for someone else's cache


def test_unreadable_manifest_names_the_spec_not_the_download_folder(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", REPO, src, COMMIT_A)
    manifest = _snap(hf_home) / "manifest.json"
    Path(os.path.realpath(manifest)).write_bytes(b'{"format_version": 1, "models": [')
    with pytest.raises(CacheError) as info:
        open_cache(SPEC)
    msg = str(info.value)
    assert msg.startswith(SPEC) and "not valid JSON" in msg
    assert "snapshots" not in msg and str(hf_home) not in msg and "re-harvest" not in msg
    assert "owner" in msg and f"hf://{REPO}@REVISION" in msg and "HF_HUB_OFFLINE" in msg
    report = verify_cache(SPEC)
    assert not report.ok and report.problems[0].startswith(SPEC)


@pytest.mark.parametrize("version, needle", [(2, "newer than this crosscache reads (v1): upgrade crosscache"),
                                             (0, "ask the repo's owner to push it in format v1")])
def test_unsupported_format_version_gives_advice_for_a_foreign_cache(tmp_path, hf_home, version, needle):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", REPO, src, COMMIT_A)
    manifest = _snap(hf_home) / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["format_version"] = version
    Path(os.path.realpath(manifest)).write_text(json.dumps(obj))
    with pytest.raises(CacheError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert msg.startswith(SPEC) and needle in msg and f"hf://{REPO}@REVISION" in msg
    assert "snapshots" not in msg and "re-harvest" not in msg


def test_manifest_damaged_locally_is_downloaded_again_online(tmp_path, hf_home, fake_hub):
    src = _cache(tmp_path / "c")
    fake_hub.add(REPO, _hub_files(src))
    snap = resolve_cache(SPEC)
    Path(os.path.realpath(snap / "manifest.json")).write_bytes(b"\x00garbage")
    assert resolve_cache(SPEC) == snap and Manifest.load(snap).n_rows == Manifest.load(src).n_rows
    assert fake_hub.gets["manifest.json"] == 2


def test_manifest_damaged_on_the_hub_blames_the_repo_not_the_user(tmp_path, hf_home, fake_hub):
    src = _cache(tmp_path / "c")
    files = _hub_files(src)
    files["manifest.json"] = b'{"format_version": 1}'
    fake_hub.add(REPO, files)
    with pytest.raises(CacheError) as info:
        resolve_cache(SPEC)
    msg = str(info.value)
    assert msg.startswith(SPEC) and "missing required key(s)" in msg
    assert "copy on the Hub is damaged" in msg and "push the cache again" in msg
    assert "snapshots" not in msg and "re-harvest" not in msg
    assert fake_hub.gets["manifest.json"] == 2  # fetched again once before blaming the repo


# --------------------------------------------------------------------------------------------
# 4. only the files the manifest lists are downloaded


def test_whole_cache_download_fetches_only_listed_files(tmp_path, hf_home, fake_hub, monkeypatch):
    from huggingface_hub import constants

    src = _cache(tmp_path / "c")  # norm_scale: no normalization side file listed
    files = _hub_files(src)
    assert "normalization.safetensors" not in files
    files |= {
        "shards/acts-00099.safetensors": b"x" * 1000,  # a shard no manifest lists
        "shards/notes.txt": b"mine",
        "shards/old/acts-00000.safetensors": b"y" * 100,
        "normalization.safetensors": b"z" * 100,  # present, not listed (the manifest says norm_scale)
        "extra/big.bin": b"w" * 100,
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }
    fake_hub.add(REPO, files)
    snap = resolve_cache(SPEC)
    assert sorted(fake_hub.gets) == sorted(["manifest.json", "README.md", "tokens.arrow", *SHARDS])
    on_disk = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    assert on_disk == sorted(["manifest.json", "README.md", "tokens.arrow", *SHARDS])
    # Offline later, the same copy serves (huggingface_hub's cached file list must not make it
    # look incomplete for lack of the files deliberately skipped).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_cache(SPEC) == snap and open_cache(SPEC).n_shards == 4


# --------------------------------------------------------------------------------------------
# 5. the cache's own tokenizer.json comes with it; `verify hf://` hashes each file once


def test_the_listed_tokenizer_is_downloaded_checked_and_in_partial_views(tmp_path, hf_home, fake_hub, hashed):
    from tests.cache_factory import add_tokenizer
    from train.token_text import load_token_decoder

    src = _cache(tmp_path / "c")
    data = add_tokenizer(src)
    fake_hub.add(REPO, _hub_files(src))
    view = resolve_cache(SPEC, max_shards=1)
    assert (view / "tokenizer.json").read_bytes() == data and verify_cache(view).ok
    assert "tokenizer.json" in hashed  # checked against the manifest's file_sha256
    cache = open_cache(view)
    assert load_token_decoder(cache.manifest.tokenizer, cache.dir)(3) == "t3"
    snap = resolve_cache(SPEC)
    assert (snap / "tokenizer.json").read_bytes() == data
    # Damaged in the local HF cache: found, and downloaded again.
    _flip_bit(snap / "tokenizer.json", offset=len(data) // 2)
    assert resolve_cache(SPEC) == snap and (snap / "tokenizer.json").read_bytes() == data
    assert fake_hub.gets["tokenizer.json"] == 2
    # A repo whose manifest lists a tokenizer.json it does not hold: the error names it.
    files = _hub_files(src, "alice/no-tok")
    del files["tokenizer.json"]
    fake_hub.add("alice/no-tok", files)
    with pytest.raises(HubError, match=r"lacks 1 file\(s\) its manifest lists: tokenizer\.json"):
        resolve_cache("hf://alice/no-tok")
    # Another tool's cache may list the file without its sha256: downloaded, and read, unchecked.
    files = _hub_files(src, "alice/tok-no-sha")
    obj = json.loads(files["manifest.json"])
    del obj["tokenizer"]["file_sha256"]
    files["manifest.json"] = json.dumps(obj).encode()
    fake_hub.add("alice/tok-no-sha", files)
    assert (resolve_cache("hf://alice/tok-no-sha") / "tokenizer.json").read_bytes() == data


def test_verify_of_a_hub_cache_hashes_each_file_once(tmp_path, hf_home, fake_hub, hashed, monkeypatch):
    import shared.cache
    from tests.cache_factory import add_tokenizer

    src = _cache(tmp_path / "c", mean_std=True)
    add_tokenizer(src)
    fake_hub.add(REPO, _hub_files(src))
    verify_hashed: list[str] = []
    real_sha256_file = shared.cache.sha256_file

    def spy(path):
        verify_hashed.append(Path(path).name)
        return real_sha256_file(path)

    monkeypatch.setattr(shared.cache, "sha256_file", spy)
    report = verify_cache(SPEC)  # the first run: download, check, verify
    assert report.ok, report.problems
    checked = sorted(SHARDS + ["normalization.safetensors", "tokenizer.json", "tokens.arrow"])
    assert sorted(hashed) == checked  # by the download check, once each
    assert verify_hashed == []  # and not again by verify
    # A later run: the download check remembers; verify checks in full, each file once.
    hashed.clear()
    assert verify_cache(SPEC).ok
    assert hashed == [] and sorted(verify_hashed) == sorted(Path(f).name for f in SHARDS + ["tokenizer.json"])


def test_fresh_digests_stand_only_for_the_file_that_was_hashed(tmp_path):
    from shared.hub import FreshDigests

    path = tmp_path / "f"
    path.write_bytes(b"abc")
    st = path.stat()
    fresh = FreshDigests()
    fresh.add(path, "d" * 64, (st.st_size, st.st_mtime_ns, st.st_ino))
    assert fresh.get(path) == "d" * 64 and fresh.get(tmp_path / "other") is None
    path.write_bytes(b"abd")  # rewritten since: hashed again by whoever asks
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert fresh.get(path) is None


def test_upload_and_download_tell_network_errors_apart_alike(tmp_path, hf_home, monkeypatch):
    """One helper (shared.hub_spec._network_cause) serves both directions: an upload whose connection
    error huggingface_hub wrapped in another exception is a HubError that says to run again."""
    import httpx
    import huggingface_hub

    import shared.hub_fetch
    import shared.hub_push_common
    from shared.hub import push_cache

    assert shared.hub_push_common._network_cause is shared.hub_fetch._network_cause
    src = _cache(tmp_path / "c")

    def fail(*args, **kwargs):
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError as net:
            raise ValueError("Upload failed due to the above error.") from net

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fail)
    with pytest.raises(HubError, match=r"could not be reached.*run the same command again"):
        push_cache(src, REPO)
