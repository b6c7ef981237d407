"""``push`` never leaves an old manifest over new data, and never replaces what a repo holds unasked.

Nothing here reaches the Hub. :class:`FakeHub` stands in for the ``HfApi`` calls a push makes
(the approach of ``tests/test_hub.py``, with state): dataset repos as branches of files, every
write a commit. :func:`materialize` then lays a branch out as ``huggingface_hub`` caches a
snapshot, so ``hf://`` opens and verifies what the push left, offline, as a reader would see it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import run_harvest
from shared.cache import open_cache, verify_cache
from shared.cache_format import CacheError, Manifest
from shared.hub import HubError, push_cache
from tests.cache_factory import shard_rows
from tests.test_hub import FAKE_TOKEN, _cache, _edit_manifest, hf_home  # noqa: F401 (hf_home: a fixture)

REPO = "alice/toy-diff"
WRITES = ("create_repo", "create_branch", "create_commit", "upload_folder")


def _http_error(cls: type, status: int, message: str) -> Exception:
    """A ``huggingface_hub`` HTTP error as the library raises it (it needs a response)."""
    try:
        import httpx2 as http
    except ImportError:  # huggingface_hub 1.x
        import httpx as http
    return cls(message, response=http.Response(status, request=http.Request("GET", "http://127.0.0.1:9/fake")))


class FakeHub:
    """In-memory dataset repos (``repo -> branch -> {path: bytes}``) behind the ``HfApi`` calls of a push.

    Every write is a commit with a new head. ``fail_upload_after=N`` makes the next data upload
    commit its first N files and then lose the connection (an interrupted, batched upload).
    ``log`` records each call as ``(name, detail)``.
    """

    def __init__(self) -> None:
        self.files: dict[str, dict[str, dict[str, bytes]]] = {}
        self.heads: dict[str, dict[str, str]] = {}
        self.log: list[tuple[str, object]] = []
        self.fail_upload_after: int | None = None
        self.private: dict[str, bool] = {}  # repo -> whether it is private
        self.home: Path | None = None  # the HF_HOME of the test, set by the fixture
        self._n = 0

    # ---- state helpers for tests
    def put(self, repo: str, files: dict[str, bytes], branch: str = "main", private: bool = False) -> None:
        """Make ``repo`` exist (public unless ``private``) with exactly ``files`` (plus ``.gitattributes``)
        on ``branch``."""
        self.private.setdefault(repo, private)
        self.files.setdefault(repo, {})[branch] = {".gitattributes": b"*.safetensors filter=lfs\n", **files}
        self._commit(repo, branch)

    def state(self, repo: str) -> dict:
        return json.loads(json.dumps({b: {p: hashlib.sha256(d).hexdigest() for p, d in f.items()}
                                      for b, f in self.files.get(repo, {}).items()}))

    def writes(self) -> list[str]:
        return [name for name, _ in self.log if name in WRITES]

    def _commit(self, repo: str, branch: str) -> str:
        self._n += 1
        self.heads.setdefault(repo, {})[branch] = hashlib.sha1(str(self._n).encode()).hexdigest()
        return f"https://huggingface.co/datasets/{repo}/commit/{self.heads[repo][branch]}"

    def _branch(self, repo: str, revision: str | None) -> dict[str, bytes]:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if repo not in self.files:
            raise _http_error(RepositoryNotFoundError, 404, f"404: repository {repo} not found")
        if (revision or "main") not in self.files[repo]:
            raise _http_error(RevisionNotFoundError, 404, f"404: revision {revision} not found")
        return self.files[repo][revision or "main"]

    # ---- the HfApi calls (patched onto the class: ``api`` is the HfApi instance)
    def list_repo_files(self, api, repo_id, *, revision=None, repo_type=None, **kw):
        self.log.append(("list_repo_files", revision))
        return sorted(self._branch(repo_id, revision))

    def hf_hub_download(self, api, repo_id, filename, *, repo_type=None, revision=None, local_dir=None, **kw):
        self.log.append(("hf_hub_download", filename))
        assert local_dir is not None  # the push reads the manifest into a temporary folder
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._branch(repo_id, revision)[filename])
        return str(path)

    def repo_info(self, api, repo_id, *, repo_type=None, revision=None, **kw):
        from types import SimpleNamespace

        from huggingface_hub.errors import OfflineModeIsEnabled

        if revision is not None:  # snapshot_download resolving a revision: hf:// reads here use the local HF cache
            raise OfflineModeIsEnabled("fake: downloads are offline in these tests (materialize lays them out)")
        self.log.append(("repo_info", repo_id))
        self._branch(repo_id, None)  # a missing repo raises the Hub's 404
        return SimpleNamespace(id=repo_id, private=self.private[repo_id])

    def create_repo(self, api, repo_id, *, repo_type=None, private=False, exist_ok=False, **kw):
        self.log.append(("create_repo", repo_id))
        assert repo_type == "dataset"
        if repo_id not in self.files:  # an existing repo keeps its visibility, as on the Hub
            self.put(repo_id, {}, private=private)

    def create_branch(self, api, repo_id, *, branch, repo_type=None, exist_ok=False, **kw):
        self.log.append(("create_branch", branch))
        if branch not in self.files[repo_id]:
            self.files[repo_id][branch] = dict(self.files[repo_id]["main"])  # from main, as the Hub does
            self._commit(repo_id, branch)

    def upload_folder(self, api, *, repo_id, folder_path, repo_type=None, revision=None, allow_patterns=None,
                      ignore_patterns=None, commit_message=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        on_disk = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        chosen = list(filter_repo_objects(on_disk, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.log.append(("upload_folder", chosen))
        branch = self._branch(repo_id, revision)
        fail, self.fail_upload_after = self.fail_upload_after, None
        for i, rel in enumerate(chosen):
            if fail is not None and i == fail:
                self._commit(repo_id, revision or "main")  # the batches before the drop are committed
                raise ConnectionError("fake: connection reset by peer")
            branch[rel] = (Path(folder_path) / rel).read_bytes()  # committed in batches: each file lands
        self._commit(repo_id, revision or "main")

    def create_commit(self, api, repo_id, operations, *, commit_message, repo_type=None, revision=None, **kw):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops = list(operations)
        self.log.append(("create_commit", [(type(op).__name__[len("CommitOperation"):], op.path_in_repo)
                                           for op in ops]))
        branch = self._branch(repo_id, revision)
        for op in ops:
            if isinstance(op, CommitOperationDelete):
                del branch[op.path_in_repo]  # the Hub refuses to delete a missing file, so does this
            elif isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                branch[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()

        class Info:
            commit_url = self._commit(repo_id, revision or "main")

        return Info()


@pytest.fixture
def fake_hub(hf_home, monkeypatch) -> FakeHub:  # noqa: F811 (hf_home: the fixture of tests/test_hub.py)
    """A :class:`FakeHub` patched onto ``HfApi`` (for huggingface_hub 2.x's code path: ``upload_folder``),
    in the offline HF cache of ``hf_home`` (``.home``), where :func:`materialize` lays snapshots out."""
    import huggingface_hub
    from huggingface_hub import constants

    hub = FakeHub()
    hub.home = hf_home
    for name in ("list_repo_files", "hf_hub_download", "repo_info", "create_repo", "create_branch", "upload_folder",
                 "create_commit"):
        method = getattr(hub, name)
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda api, *a, _m=method, **k: _m(api, *a, **k))
    monkeypatch.delattr(huggingface_hub.HfApi, "upload_large_folder", raising=False)
    # A safety net: anything not faked above fails fast here instead of reaching the real Hub.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return hub


def materialize(hub: FakeHub, repo: str = REPO, branch: str = "main") -> Path:
    """Lay ``branch`` of ``repo`` out in the local HF cache as ``huggingface_hub`` caches a snapshot."""
    assert hub.home is not None
    commit = hub.heads[repo][branch]
    repo_dir = hub.home / "hub" / f"datasets--{repo.replace('/', '--')}"
    for rel, data in hub.files[repo][branch].items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)
    return repo_dir / "snapshots" / commit


@contextmanager
def online(monkeypatch) -> Iterator[None]:
    """Let a dry run look at the (fake) repo, which it does not do while HF_HUB_OFFLINE=1.

    Only for the push: reading ``hf://`` stays offline (the local HF cache), outside the block.
    """
    from huggingface_hub import constants

    with monkeypatch.context() as m:
        m.setattr(constants, "HF_HUB_OFFLINE", False)
        yield


def _cache_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def two_caches(tmp_path) -> tuple[Path, Path]:
    """Cache A (4 shards, mean_std with its side file) and a different cache B (2 shards, no side file):
    B's shards go up under the names A's first two use."""
    return (_cache(tmp_path / "a", seed=1, mean_std=True),
            _cache(tmp_path / "b", seed=2, rows=[40, 40]))


# --------------------------------------------------------------------------------------------
# refusals: nothing uploaded, the repo unchanged


def test_push_refuses_to_replace_a_different_cache(fake_hub, two_caches, monkeypatch, capsys):
    a, b = two_caches
    push_cache(a, REPO)  # into a repo that does not exist: created, no questions
    before, n_log = fake_hub.state(REPO), len(fake_hub.log)

    with pytest.raises(HubError) as err:
        push_cache(b, REPO)
    msg = str(err.value)
    assert f"refusing to push to {REPO}: it holds a different crosscache cache" in msg
    assert f"{sum([64, 48, 64, 32]):,} rows in 4 shards" in msg and "this cache: model0, model1" in msg
    assert "--force" in msg and "--revision" in msg and "--repo" in msg
    assert [name for name, _ in fake_hub.log[n_log:] if name in WRITES] == []  # looked, wrote nothing
    assert fake_hub.state(REPO) == before

    assert run_harvest.main(["push", str(b), "--repo", REPO]) == 2
    err_out = capsys.readouterr().err
    assert "different crosscache cache" in err_out and "--force" in err_out and "Traceback" not in err_out
    # Alike in models, hooks, rows and shards (the description was the same twice): what differs is named.
    with pytest.raises(HubError, match=r"; they differ in normalization \(mean_std vs none\), the contents "
                                       r"of 4 of 4 shards \(sha256\)\)"):
        push_cache(_cache(a.parent / "alike", seed=3), REPO)
    # A dry run (online) says the same, and still uploads nothing.
    with online(monkeypatch):
        assert run_harvest.main(["push", str(b), "--repo", REPO, "--dry-run"]) == 2
    err_out = capsys.readouterr().err
    assert "refusing to push" in err_out and "dry run: nothing was uploaded" in err_out
    assert [name for name, _ in fake_hub.log[n_log:] if name in WRITES] == []
    assert fake_hub.state(REPO) == before
    # And the repo still reads as cache A.
    materialize(fake_hub)
    assert verify_cache(f"hf://{REPO}").ok
    assert shard_rows(open_cache(f"hf://{REPO}").dir) == shard_rows(a)


@pytest.mark.parametrize("files", [
    {"README.md": b"# My dataset\n\nHand-written card.\n", "data.csv": b"a,b\n1,2\n"},
    {"README.md": b"# My dataset\n"},  # a repo made on the website: only its own card
    {"manifest.json": b"{not json", "shards/acts-00000.safetensors": b"x"},
], ids=["readme+csv", "readme-only", "broken-manifest"])
def test_push_refuses_a_repo_that_is_not_a_cache(fake_hub, tmp_path, files, capsys):
    src = _cache(tmp_path / "c")
    fake_hub.put(REPO, files)
    before = fake_hub.state(REPO)

    with pytest.raises(HubError, match=rf"refusing to push to {REPO}: it holds \d+ file\(s\) that are not a "
                                       r"crosscache cache") as err:
        push_cache(src, REPO)
    msg = str(err.value)
    for name in files:
        assert name in msg  # names what is there
    assert "--force" in msg and "deleted" in msg and "--revision" in msg
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before
    assert run_harvest.main(["push", str(src), "--repo", REPO]) == 2
    assert "not a crosscache cache" in capsys.readouterr().err
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before


# --------------------------------------------------------------------------------------------
# --force: the old manifest goes first, the result is the new cache


def test_force_replaces_a_different_cache_manifest_first(fake_hub, two_caches, monkeypatch, capsys):
    a, b = two_caches
    push_cache(a, REPO)
    fake_hub.log.clear()

    # The dry run says what would happen (the repo is looked at read only).
    with online(monkeypatch):
        assert run_harvest.main(["push", str(b), "--repo", REPO, "--force", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}: it holds a different crosscache cache" in out
    assert "replaced (--force): its manifest.json is deleted in a commit of its own before any data goes up" in out
    assert "deleted: 3 file(s): normalization.safetensors, shards/acts-00002.safetensors, shards/acts-00003" in out
    assert fake_hub.writes() == []

    assert run_harvest.main(["push", str(b), "--repo", REPO, "--force"]) == 0
    out = capsys.readouterr()
    assert "deleted from the repo: normalization.safetensors, shards/acts-00002.safetensors" in out.out
    assert f"note: replaced the different crosscache cache (model0, model1 @ blocks.0.hook_resid_post; 208 rows " \
           f"in 4 shards) that {REPO} held" in out.err
    writes = [(name, detail) for name, detail in fake_hub.log if name in WRITES]
    # First write to the branch: a commit deleting the old manifest, alone; only then the data.
    first_commit = next(i for i, (name, _) in enumerate(writes) if name == "create_commit")
    assert writes[first_commit] == ("create_commit", [("Delete", "manifest.json")])
    assert first_commit < [name for name, _ in writes].index("upload_folder")
    # The last commit adds the manifest and card and removes what B does not use.
    assert sorted(writes[-1][1]) == sorted([("Add", "manifest.json"), ("Add", "README.md"),
                                            ("Delete", "normalization.safetensors"),
                                            ("Delete", "shards/acts-00002.safetensors"),
                                            ("Delete", "shards/acts-00003.safetensors")])
    # The branch holds exactly B's files (the card is the Hub one), and reads and verifies as B.
    assert set(fake_hub.files[REPO]["main"]) == (_cache_files(b) | {".gitattributes"})
    snap = materialize(fake_hub)
    cache = open_cache(f"hf://{REPO}")
    assert cache.dir == snap and verify_cache(f"hf://{REPO}").ok
    assert cache.manifest.n_rows == 80 and cache.normalization().method == "none"
    assert shard_rows(cache.dir) == shard_rows(b)


def test_force_replaces_a_repo_that_is_not_a_cache(fake_hub, tmp_path):
    src = _cache(tmp_path / "c")
    fake_hub.put(REPO, {"README.md": b"# My dataset\n", "data.csv": b"a,b\n1,2\n"})
    plan = push_cache(src, REPO, force=True)
    assert sorted(plan.deletes) == ["data.csv"]
    assert set(fake_hub.files[REPO]["main"]) == (_cache_files(src) | {".gitattributes"})
    assert b"crosscache" in fake_hub.files[REPO]["main"]["README.md"]  # the cache's card replaced theirs
    materialize(fake_hub)
    assert verify_cache(f"hf://{REPO}").ok


def test_interrupted_force_push_leaves_no_manifest_and_a_clear_error(fake_hub, two_caches):
    a, b = two_caches
    push_cache(a, REPO)
    fake_hub.fail_upload_after = 2  # tokens.arrow and one shard of B land, then the connection drops

    with pytest.raises(HubError, match=r"could not be reached.*run the same command again"):
        push_cache(b, REPO, force=True)
    files = fake_hub.files[REPO]["main"]
    assert "manifest.json" not in files  # not A's manifest over B's data
    assert files["shards/acts-00000.safetensors"] == (b / "shards/acts-00000.safetensors").read_bytes()
    materialize(fake_hub)
    with pytest.raises(CacheError, match=r"no manifest\.json.*re-run that `run_harvest\.py push`"):
        open_cache(f"hf://{REPO}")
    report = verify_cache(f"hf://{REPO}")
    assert not report.ok and "no manifest.json" in report.problems[0]

    # Re-running the push finishes it; the repo now holds an unfinished push, so --force is not needed.
    plan = push_cache(b, REPO)
    assert plan.contents is not None and plan.contents.state == "unfinished"
    assert set(fake_hub.files[REPO]["main"]) == (_cache_files(b) | {".gitattributes"})
    snap = materialize(fake_hub)
    assert open_cache(f"hf://{REPO}").dir == snap and verify_cache(f"hf://{REPO}").ok
    assert shard_rows(snap) == shard_rows(b)


# --------------------------------------------------------------------------------------------
# what needs no --force: the same cache again, an unfinished push, a new branch


def test_repush_of_the_same_cache_needs_no_force(fake_hub, tmp_path, monkeypatch, capsys):
    src = _cache(tmp_path / "c", mean_std=True)
    push_cache(src, REPO)
    # An interrupted re-push: the same bytes land under the same names, the manifest stays valid.
    fake_hub.fail_upload_after = 3
    with pytest.raises(HubError, match="could not be reached"):
        push_cache(src, REPO)
    materialize(fake_hub)
    assert verify_cache(f"hf://{REPO}").ok
    # The same cache, harvested again (other provenance): still the same cache.
    _edit_manifest(src, lambda m: m["created_by"].update(note="harvested again"))
    fake_hub.log.clear()
    with online(monkeypatch):
        assert run_harvest.main(["push", str(src), "--repo", REPO, "--dry-run"]) == 0
    assert f"{REPO}: it holds this same cache" in capsys.readouterr().out
    plan = push_cache(src, REPO)
    assert plan.contents is not None and plan.contents.state == "same" and plan.deletes == []
    commits = [detail for name, detail in fake_hub.log if name == "create_commit"]
    assert len(commits) == 1 and ("Delete", "manifest.json") not in commits[0]  # no manifest-first commit
    assert json.loads(fake_hub.files[REPO]["main"]["manifest.json"])["created_by"]["note"] == "harvested again"


def test_an_unfinished_first_push_and_a_new_branch_need_no_force(fake_hub, two_caches):
    a, b = two_caches
    # A first push that died mid-upload: data files, no manifest, no card.
    fake_hub.fail_upload_after = 2
    with pytest.raises(HubError):
        push_cache(a, REPO)
    assert "README.md" not in fake_hub.files[REPO]["main"]
    assert push_cache(a, REPO).contents.state == "unfinished"
    main_before = fake_hub.state(REPO)["main"]
    # A new branch starts as a copy of main (cache A): B replaces that on the branch only.
    plan = push_cache(b, REPO, revision="v2")
    assert plan.contents.new_branch and plan.contents.state == "other"
    assert ("create_commit", [("Delete", "manifest.json")]) in fake_hub.log
    assert fake_hub.state(REPO)["main"] == main_before
    assert set(fake_hub.files[REPO]["v2"]) == (_cache_files(b) | {".gitattributes"})
    materialize(fake_hub, branch="main")
    materialize(fake_hub, branch="v2")
    assert shard_rows(open_cache(f"hf://{REPO}").dir) == shard_rows(a)
    assert shard_rows(open_cache(f"hf://{REPO}@v2").dir) == shard_rows(b)
    assert verify_cache(f"hf://{REPO}@v2").ok


def test_token_never_passed_or_printed(fake_hub, two_caches, capsys):
    a, b = two_caches
    push_cache(a, REPO)
    assert run_harvest.main(["push", str(b), "--repo", REPO]) == 2
    assert run_harvest.main(["push", str(b), "--repo", REPO, "--force"]) == 0
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err + repr(fake_hub.log)


# --------------------------------------------------------------------------------------------
# --private never publishes into an existing public repo


def test_private_push_into_an_existing_public_repo_is_refused(fake_hub, tmp_path, monkeypatch, capsys):
    src = _cache(tmp_path / "c")
    fake_hub.put(REPO, {})  # made on the website: public, empty
    before = fake_hub.state(REPO)

    with pytest.raises(HubError) as err:
        push_cache(src, REPO, private=True)
    msg = str(err.value)
    assert f"refusing to push to {REPO} with --private: the repo {REPO} already is public" in msg
    assert f"https://huggingface.co/datasets/{REPO}/settings" in msg and "drop --private" in msg
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before  # refused before anything went up
    assert run_harvest.main(["push", str(src), "--repo", REPO, "--private"]) == 2
    assert "already is public" in capsys.readouterr().err
    with online(monkeypatch):  # a dry run says the same
        assert run_harvest.main(["push", str(src), "--repo", REPO, "--private", "--dry-run"]) == 2
    err_out = capsys.readouterr().err
    assert "already is public" in err_out and "dry run: nothing was uploaded" in err_out
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before

    push_cache(src, REPO)  # without --private: published, as asked
    assert "manifest.json" in fake_hub.files[REPO]["main"] and fake_hub.private[REPO] is False
    fake_hub.put("alice/secret", {}, private=True)
    push_cache(src, "alice/secret", private=True)  # an existing private repo: fine
    assert "manifest.json" in fake_hub.files["alice/secret"]["main"]
    push_cache(src, "alice/new", private=True)  # a new repo is created private
    assert fake_hub.private["alice/new"] is True
    assert ("repo_info", "alice/new") not in fake_hub.log  # nothing to look up for a repo that did not exist


# --------------------------------------------------------------------------------------------
# what is published names nothing of the pusher's machine


def _as_alice(monkeypatch, tmp_path: Path) -> tuple[Path, str]:
    """Run as user alice on host lab-gpu7 with a home folder in ``tmp_path``."""
    import socket

    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    for var, value in {"HOME": str(home), "USER": "alice", "LOGNAME": "alice"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(socket, "gethostname", lambda: "lab-gpu7.example.org")
    return home, "lab-gpu7"


def test_redaction_of_home_user_and_host_in_text():
    from shared.redact import MachineNames, redact_machine, redact_text

    names = MachineNames(("/home/alice", "/mnt/home/alice"), ("alice",), ("lab-gpu7",))
    cases = {
        "/home/alice/models/ft": "~/models/ft",
        "/home/alice": "~",
        "/mnt/home/alice/x": "~/x",  # the home folder's resolved form too
        "run_harvest.py --out=/home/alice/c --models /scratch/alice/m 'x y'": "run_harvest.py --out=~/c --models "
                                                                           "/scratch/<user>/m 'x y'",
        "/data/lab-gpu7/alice.txt": "/data/<host>/alice.txt",  # whole folder names only
        "/home/alicia/x": "/home/alicia/x",
        "/home/alice.bak/x": "/home/alice.bak/x",
        "/srv/home/alice/x": "/srv/home/<user>/x",  # not the home folder: only the user name
        "alice/toy-diff": "alice/toy-diff",  # a Hub id, not a path
        "caches/alice": "caches/alice",  # a relative path is the user's choice
        # A per-slot metric key of a model given as a folder: "eval/ev/" + "/home/alice/m" + "/hook".
        "eval/ev//home/alice/m/blocks.0.hook_x": "eval/ev/~/m/blocks.0.hook_x",
        "eval/ev//scratch/alice/m/blocks.0.hook_x": "eval/ev//scratch/<user>/m/blocks.0.hook_x",
        "/data/home/alice/x": "/data/home/<user>/x",
        "hf://alice/toy-diff@v1": "hf://alice/toy-diff@v1",  # a Hub spec is public and must stay usable
        "hf://datasets/alice/x": "hf://datasets/alice/x",
        "https://huggingface.co/alice/x": "https://huggingface.co/alice/x",
        "file:///home/alice/c": "file://~/c",
        "file:///scratch/alice/c": "file:///scratch/<user>/c",
    }
    for before, after in cases.items():
        assert redact_text(before, names) == after, before
    obj, changed = redact_machine({"models": [{"name": "toy", "path": "/home/alice/m"}], "n": 3, "ok": "x"}, names)
    assert obj == {"models": [{"name": "toy", "path": "~/m"}], "n": 3, "ok": "x"} and changed == ["models[0].path"]


def test_redaction_of_object_keys():
    """``tokenizer.extended_by`` is keyed by model name, often a local folder: keys are redacted too."""
    from shared.redact import MachineNames, redact_machine

    names = MachineNames(("/home/alice",), ("alice",), ("lab-gpu7",))
    tokenizer = {"name": "/home/alice/models/base", "extended_by": {
        "/home/alice/models/chat": {"n_added": 2, "added": ["<|im_start|>", "/home/alice"]},
        "/scratch/alice/other": {"n_added": 1, "added": ["<x>"]}, "org/model": {"n_added": 0, "added": []}}}
    obj, changed = redact_machine({"tokenizer": tokenizer}, names)
    assert obj["tokenizer"]["extended_by"] == {
        "~/models/chat": {"n_added": 2, "added": ["<|im_start|>", "~"]},
        "/scratch/<user>/other": {"n_added": 1, "added": ["<x>"]}, "org/model": {"n_added": 0, "added": []}}
    assert changed == ["tokenizer.name", "tokenizer.extended_by.~/models/chat (key)",
                       "tokenizer.extended_by.~/models/chat.added[1]",
                       "tokenizer.extended_by./scratch/<user>/other (key)"]
    # Two keys that become one are both kept.
    obj, _ = redact_machine({"/home/alice/m": 1, "~/m": 2}, names)
    assert obj == {"~/m (2)": 1, "~/m": 2}


def test_redaction_leaves_short_and_generic_names_alone():
    """A host ``vm`` or user ``ai`` is no one's name: /var/lib/vm stays as it is. The home folder is still ``~``."""
    from shared.redact import MachineNames, redact_text

    names = MachineNames(("/home/vm", "/root"), ("ai", "root", "vm", "bob"), ("vm", "lab"))
    cases = {
        "/var/lib/vm/disk.img": "/var/lib/vm/disk.img",
        "/srv/ai/models": "/srv/ai/models",
        "/dev/root": "/dev/root",
        "/home/vm/models/ft": "~/models/ft",  # the home folder, whatever its name
        "/root/models/ft": "~/models/ft",
        "/scratch/bob/lab/c": "/scratch/<user>/<host>/c",  # 3 characters and more: replaced
    }
    for before, after in cases.items():
        assert redact_text(before, names) == after, before


def test_push_publishes_no_home_user_or_host_and_leaves_the_cache_alone(fake_hub, tmp_path, monkeypatch, capsys):
    home, host = _as_alice(monkeypatch, tmp_path)
    src = _cache(tmp_path / "c", mean_std=True)
    models_dir = home / "models" / "ft"

    def from_alices_machine(m: dict) -> None:
        m["models"][0].update(name=str(models_dir), path=str(models_dir))
        m["tokenizer"].update(name=str(models_dir), path=str(models_dir))
        m["dataset"]["name"] = f"/data/{host}/corpus.jsonl"
        m["created_by"]["command"] = f"run_harvest.py --models {models_dir} --out /scratch/alice/caches/c"
        m["harvest"] = {"config": {"out": str(home / "caches" / "c"), "models": [str(models_dir)]}}
        # --allow-vocab-extension: what each other model added, keyed by its name (here a local folder)
        m["tokenizer"]["extended_by"] = {str(home / "models" / "chat"): {"n_added": 1, "added": ["<|im_start|>"]}}

    _edit_manifest(src, from_alices_machine)
    local = (src / "manifest.json").read_bytes()
    local_files = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    assert run_harvest.main(["push", str(src), "--repo", REPO]) == 0
    err = capsys.readouterr().err
    assert "field(s) of the published manifest.json and README.md name this machine's home folder" in err
    assert "models[0].name" in err and "the local cache is not changed" in err
    published = fake_hub.files[REPO]["main"]
    for name in ("manifest.json", "README.md"):
        text = published[name].decode()
        for secret in (str(home), "alice", host):
            assert secret not in text.replace(f"hf://{REPO}", "").replace(REPO, ""), (name, secret)
    obj = json.loads(published["manifest.json"])
    assert obj["models"][0]["path"] == "~/models/ft" and obj["tokenizer"]["name"] == "~/models/ft"
    assert obj["dataset"]["name"] == "/data/<host>/corpus.jsonl"
    assert obj["created_by"]["command"] == "run_harvest.py --models ~/models/ft --out /scratch/<user>/caches/c"
    assert obj["harvest"]["config"] == {"out": "~/caches/c", "models": ["~/models/ft"]}
    assert obj["tokenizer"]["extended_by"] == {"~/models/chat": {"n_added": 1, "added": ["<|im_start|>"]}}
    assert "`~/models/ft`" in published["README.md"].decode()  # the card is made from the published manifest
    # The local cache is exactly as it was.
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == local_files
    assert (src / "manifest.json").read_bytes() == local

    # The redacted manifest still reads, verifies, and is recognised as this same cache on a re-push.
    materialize(fake_hub)
    assert verify_cache(f"hf://{REPO}").ok
    assert shard_rows(open_cache(f"hf://{REPO}").dir) == shard_rows(src)
    plan = push_cache(src, REPO)
    assert plan.contents is not None and plan.contents.state == "same"


# --------------------------------------------------------------------------------------------
# the tokenizer goes with the cache


def test_push_uploads_the_caches_own_tokenizer(fake_hub, tmp_path):
    from tests.cache_factory import add_tokenizer

    src = _cache(tmp_path / "c")
    data = add_tokenizer(src)
    plan = push_cache(src, REPO)
    assert [f for f, _ in plan.final_files] == ["tokenizer.json", "manifest.json", "README.md"]
    commit = [detail for name, detail in fake_hub.log if name == "create_commit"][-1]
    assert ("Add", "tokenizer.json") in commit  # with the manifest that lists it, in one commit
    assert fake_hub.files[REPO]["main"]["tokenizer.json"] == data
    assert json.loads(fake_hub.files[REPO]["main"]["manifest.json"])["tokenizer"]["file"] == "tokenizer.json"


def test_push_of_a_cache_without_a_tokenizer_publishes_the_one_found_here(fake_hub, tmp_path, capsys):
    from shared.tokenizer_file import vocab_fingerprint
    from tests.cache_factory import add_tokenizer, synthetic_tokenizer_json
    from train.token_text import load_token_decoder

    src = _cache(tmp_path / "c")
    data = add_tokenizer(src, folder=tmp_path / "model")  # harvested before caches held their tokenizer
    local = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    assert run_harvest.main(["push", str(src), "--repo", REPO]) == 0
    err = capsys.readouterr().err
    assert (f"note: the cache has no tokenizer.json of its own (harvested before crosscache saved one): publishing "
            f"{tmp_path / 'model' / 'tokenizer.json'} (found through the manifest's tokenizer path; its vocabulary "
            "matches the cache's)") in err and "the local cache is not changed" in err
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == local  # nothing written into it
    published = fake_hub.files[REPO]["main"]
    assert published["tokenizer.json"] == data
    entry = json.loads(published["manifest.json"])["tokenizer"]
    assert entry["file"] == "tokenizer.json" and entry["file_sha256"] == hashlib.sha256(data).hexdigest()
    # Read elsewhere (the model folder gone), the Hub copy shows the tokens as text.
    (tmp_path / "model" / "tokenizer.json").unlink()
    materialize(fake_hub)
    cache = open_cache(f"hf://{REPO}")
    assert verify_cache(f"hf://{REPO}").ok
    assert load_token_decoder(cache.manifest.tokenizer, cache.dir)(7) == "t7"
    # A re-push of the same cache finds the same tokenizer: nothing to delete, still the same cache.
    (tmp_path / "model" / "tokenizer.json").write_bytes(data)
    assert push_cache(src, REPO).deletes == []

    # A tokenizer.json whose vocabulary is not the cache's is not published, and the push says why.
    other = _cache(tmp_path / "o", seed=3)
    add_tokenizer(other, folder=tmp_path / "m2")
    (tmp_path / "m2" / "tokenizer.json").write_bytes(synthetic_tokenizer_json(prefix="w"))
    assert vocab_fingerprint(tmp_path / "m2" / "tokenizer.json") != Manifest.load(other).tokenizer["sha256"]
    plan = push_cache(other, "alice/other")
    assert "tokenizer.json" not in fake_hub.files["alice/other"]["main"]
    assert any("no tokenizer.json published" in n and "its vocabulary is not the one the cache was harvested with"
               in n for n in plan.notes), plan.notes
    # None to be found: said too.
    plan = push_cache(_cache(tmp_path / "n", seed=4), "alice/none", dry_run=True)
    assert any("none was found on this machine for its tokenizer 'synthetic'" in n for n in plan.notes), plan.notes


def test_a_repush_from_a_machine_without_the_tokenizer_keeps_the_one_published(fake_hub, tmp_path, monkeypatch,
                                                                               capsys):
    """A cache without a tokenizer.json of its own, first pushed from a machine that had its tokenizer, then
    re-pushed from one that has none: the repo keeps the one published, listed as before."""
    from tests.cache_factory import add_tokenizer
    from train.token_text import load_token_decoder

    src = _cache(tmp_path / "c")
    data = add_tokenizer(src, folder=tmp_path / "model")
    push_cache(src, REPO)
    first = json.loads(fake_hub.files[REPO]["main"]["manifest.json"])["tokenizer"]
    assert first["file"] == "tokenizer.json"
    (tmp_path / "model" / "tokenizer.json").unlink()  # another machine: no tokenizer to be found

    with online(monkeypatch):
        assert run_harvest.main(["push", str(src), "--repo", REPO, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert f"{REPO}: it holds this same cache" in out.out and "kept: tokenizer.json" in out.out
    assert "deleted:" not in out.out and "no tokenizer.json published" not in out.err
    assert (f"the tokenizer.json an earlier push published to {REPO} with this same cache is kept, and listed in the "
            "published manifest as before") in out.err
    plan = push_cache(src, REPO)
    assert plan.contents is not None and plan.contents.state == "same"
    assert plan.deletes == [] and plan.kept == ["tokenizer.json"]
    published = fake_hub.files[REPO]["main"]
    assert published["tokenizer.json"] == data
    entry = json.loads(published["manifest.json"])["tokenizer"]
    assert (entry["file"], entry["file_sha256"]) == (first["file"], first["file_sha256"])
    assert b"`tokenizer.json`" in published["README.md"]  # the card lists it too
    materialize(fake_hub)
    cache = open_cache(f"hf://{REPO}")
    assert verify_cache(f"hf://{REPO}").ok
    assert load_token_decoder(cache.manifest.tokenizer, cache.dir)(7) == "t7"

    # Found again, but a different file (the same vocabulary): it replaces the published one, and says so.
    other = json.dumps(json.loads(data)).encode()
    (tmp_path / "model" / "tokenizer.json").write_bytes(other)
    plan = push_cache(src, REPO)
    assert plan.kept == [] and fake_hub.files[REPO]["main"]["tokenizer.json"] == other
    assert any("differs from the one an earlier push published" in n for n in plan.notes), plan.notes
    assert json.loads(fake_hub.files[REPO]["main"]["manifest.json"])["tokenizer"]["file_sha256"] == \
        hashlib.sha256(other).hexdigest()
