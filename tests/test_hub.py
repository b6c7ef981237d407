"""Caches on the Hugging Face Hub (shared/hub.py), tested without the network.

Nothing here reaches the Hub: ``HF_HUB_OFFLINE=1`` is forced, uploads are either dry runs,
refused offline, or go to a recording stand-in for ``HfApi``. ``hf://`` resolution reads a
Hugging Face cache folder that the test populates with the layout ``huggingface_hub`` itself
writes for a dataset snapshot (``datasets--OWNER--NAME/{refs,snapshots,blobs}``); that
``huggingface_hub.scan_cache_dir`` accepts it is checked, so the layout is the library's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.cache import Cache, open_cache, verify_cache
from shared.cache_format import CacheError, Manifest
from shared.card import render_card
from shared.hub import HubError, is_hub_spec, parse_hub_spec, push_cache, resolve_cache
from shared.normalization import Normalization
from tests.cache_factory import make_cache, shard_rows

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FAKEtokenForTestsOnly0123456789abcdefXYZ"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
ROWS = [64, 48, 64, 32]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache in ``tmp_path`` and a fake token in the environment."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    # huggingface_hub reads these at import time: point the already-imported module too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def _cache(path: Path, *, seed: int = 0, rows=ROWS, mean_std: bool = False) -> Path:
    """A small real v1 cache (tagged rows); optionally ``mean_std`` with its side file."""
    make_cache(path, n_shards=len(rows), rows_per_shard=rows, d_model=8, seq_len=16, seed=seed)
    if mean_std:
        raw = torch.randn(100, 2, 1, 8)
        norm = Normalization.estimate(raw, "mean_std")
        norm.write_side_file(path)
        _edit_manifest(path, lambda m: m.update(normalization=norm.to_manifest(100)))
    return path


def _edit_manifest(path: Path, change) -> None:
    obj = json.loads((path / "manifest.json").read_text())
    change(obj)
    (path / "manifest.json").write_text(json.dumps(obj, indent=1) + "\n")


def publish(hub: Path, repo: str, src: Path, commit: str, refs=("main",), only=None) -> None:
    """Put what ``push`` would upload from ``src`` into ``hub`` as snapshot ``commit`` of ``repo``.

    The layout is the one ``huggingface_hub`` writes: content-addressed ``blobs/``, a
    ``snapshots/<commit>/`` tree of relative symlinks to them, ``refs/<name>`` holding the
    commit. ``only`` restricts the files (a partially downloaded snapshot).
    """
    plan = push_cache(src, repo, dry_run=True)
    repo_dir = hub / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, _ in plan.files:
        if only is not None and rel not in only:
            continue
        data = plan.content(rel)  # the generated manifest and card, as the push uploads them
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


def _rows(path) -> list[tuple[int, int]]:
    return shard_rows(path)


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def _run_cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_harvest.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


# --------------------------------------------------------------------------------------------
# the dataset card


def test_card_describes_the_cache_and_how_to_load_it(tmp_path):
    src = _cache(tmp_path / "c", mean_std=True)
    man = Manifest.load(src)
    card = render_card(man, hub_repo="alice/toy-diff", hub_revision="v1")
    for needle in ("`model0`", "`model1`", "blocks.0.hook_resid_post", f"{man.n_rows:,}", "`bfloat16`",
                   "`mean_std`", "format v1", "(2, 1, 8)", "## Loading from the Hub",
                   'open_cache("hf://alice/toy-diff@v1")', 'open_cache("hf://alice/toy-diff@v1", max_shards=2)',
                   'snapshot_download("alice/toy-diff", repo_type="dataset", revision=\'v1\')'):
        assert needle in card, needle
    assert card.startswith("---\ntags:\n")  # Hub metadata block stays first
    # Existing callers are unchanged: no parameter, no Hub section; the local card is that.
    plain = render_card(man)
    assert "Loading from the Hub" not in plain and card.startswith(plain)
    main_card = render_card(man, hub_repo="alice/toy-diff")
    assert 'open_cache("hf://alice/toy-diff")' in main_card and "revision=" not in main_card


# --------------------------------------------------------------------------------------------
# push: dry run, refusals, the upload calls


def test_dry_run_prints_card_and_exact_file_list_and_uploads_nothing(tmp_path, hf_home, monkeypatch, capsys):
    import huggingface_hub

    import run_harvest

    calls = []
    for name in ("create_repo", "create_branch", "upload_folder", "upload_large_folder", "create_commit",
                 "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _n=name, **k: calls.append(_n), raising=False)
    src = _cache(tmp_path / "c", mean_std=True)
    # Strays that must never be uploaded: a writer's temp file, an unlisted shard, a note.
    (src / "shards" / ".acts-00004.safetensors.tmp-123").write_bytes(b"half")
    (src / "shards" / "acts-00099.safetensors").write_bytes(b"not listed")
    (src / "notes.txt").write_text("mine")
    before = _tree_digest(src)

    rc = run_harvest.main(["push", str(src), "--repo", "alice/toy-diff", "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert calls == []  # nothing reached (even a stand-in for) the Hub
    assert _tree_digest(src) == before  # and nothing was written into the cache
    expected = ["tokens.arrow", "normalization.safetensors"] + [f"shards/acts-{i:05d}.safetensors" for i in range(4)] \
        + ["manifest.json", "README.md"]
    listed = [line.split()[0] for line in out.out.split("--- files for")[1].splitlines()[1:] if line.startswith("  ")]
    assert listed == expected
    assert "## Loading from the Hub" in out.out and "hf://alice/toy-diff" in out.out
    assert "tmp-123" not in out.out and "acts-00099" not in out.out and "notes.txt" not in out.out
    assert "dry run: nothing uploaded" in out.out
    assert "auth: a Hugging Face token is available" in out.out  # says whether, never what
    assert FAKE_TOKEN not in out.out + out.err

    plan = push_cache(src, "alice/toy-diff", dry_run=True)
    assert [f for f, _ in plan.files] == expected
    sizes = dict(plan.files)
    assert sizes["shards/acts-00002.safetensors"] == (src / "shards/acts-00002.safetensors").stat().st_size
    assert sizes["README.md"] == len(plan.card.encode())
    assert plan.n_rows == sum(ROWS)


def test_push_refuses_an_incomplete_cache(tmp_path, capsys):
    import run_harvest

    src = _cache(tmp_path / "c")
    _edit_manifest(src, lambda m: m.update(complete=False))
    with pytest.raises(CacheError, match=r"(?s)refusing to push.*harvest not complete"):
        push_cache(src, "alice/toy-diff", dry_run=True)
    assert run_harvest.main(["push", str(src), "--repo", "alice/toy-diff", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "harvest not complete" in err and "Traceback" not in err


def test_push_refuses_a_corrupted_shard_naming_it(tmp_path, hf_home, capsys):
    import run_harvest

    src = _cache(tmp_path / "c")
    shard = src / "shards" / "acts-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's payload: size and header still fine
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shards/acts-00001\.safetensors: sha256 mismatch"):
        push_cache(src, "alice/toy-diff", dry_run=True)
    assert run_harvest.main(["push", str(src), "--repo", "alice/toy-diff"]) == 2  # refused before any upload
    assert "acts-00001.safetensors: sha256 mismatch" in capsys.readouterr().err


def test_push_refuses_a_missing_shard_and_bad_arguments(tmp_path):
    src = _cache(tmp_path / "c")
    (src / "shards" / "acts-00003.safetensors").unlink()
    with pytest.raises(CacheError, match=r"acts-00003\.safetensors: missing"):
        push_cache(src, "alice/toy-diff", dry_run=True)
    good = _cache(tmp_path / "g")
    for repo in ("toy-diff", "alice/", "alice/toy--diff", "a/b/c", "alice/toy diff"):
        with pytest.raises(ValueError, match="USER/NAME"):
            push_cache(good, repo, dry_run=True)
    with pytest.raises(ValueError, match="branch"):
        push_cache(good, "alice/toy-diff", revision=COMMIT_A, dry_run=True)


def test_push_offline_fails_cleanly(tmp_path):
    src = _cache(tmp_path / "c")
    proc = _run_cli(["push", str(src), "--repo", "alice/toy-diff"],
                    {"HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 2, proc.stderr
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert _files_containing(tmp_path, FAKE_TOKEN) == []


class RecordingHub:
    """A recording stand-in for ``HfApi`` (no network): each call is kept in ``calls``; ``upload_folder``
    adds to the branch's ``files`` what huggingface_hub's own folder listing picks (``upload=False``:
    nothing), which ``list_repo_files`` then returns."""

    class Info:
        commit_url = "https://huggingface.co/datasets/alice/toy-diff/commit/123"

    class RepoInfo:
        private = True  # an existing private repo: a --private push goes ahead

    def __init__(self, monkeypatch, files: list[str], upload: bool = True):
        import huggingface_hub

        self.calls: list[tuple[str, dict]] = []
        self.files = list(files)
        hub = self

        def record(name, result=None):
            def fn(api, *args, **kwargs):
                hub.calls.append((name, {"args": args, **kwargs}))
                if name == "upload_folder" and upload:
                    ops = api._prepare_upload_folder_additions(
                        kwargs["folder_path"], "", allow_patterns=kwargs["allow_patterns"],
                        ignore_patterns=kwargs["ignore_patterns"])
                    hub.files += [op.path_in_repo for op in ops]
                return list(hub.files) if name == "list_repo_files" else result
            return fn

        monkeypatch.delattr(huggingface_hub.HfApi, "upload_large_folder", raising=False)
        for name, result in [("create_repo", None), ("create_branch", None), ("upload_folder", None),
                             ("list_repo_files", None), ("create_commit", self.Info()),
                             ("repo_info", self.RepoInfo())]:
            monkeypatch.setattr(huggingface_hub.HfApi, name, record(name, result))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_push_uploads_data_first_then_manifest_and_card(tmp_path, hf_home, monkeypatch):
    """The upload sequence, against a recording stand-in for the Hub (no network)."""
    from huggingface_hub.utils import filter_repo_objects

    hub = RecordingHub(monkeypatch, [".gitattributes", "README.md", "shards/acts-00000.safetensors",
                                     "shards/acts-00042.safetensors"])
    calls, Info = hub.calls, hub.Info
    src = _cache(tmp_path / "c")
    (src / "shards" / ".acts-00004.safetensors.tmp-9").write_bytes(b"half")
    (src / "shards" / "acts-00077.safetensors").write_bytes(b"not listed")
    (src / "notes.txt").write_text("mine")

    plan = push_cache(src, "alice/toy-diff", private=True, revision="v2")
    # The first list_repo_files looks at what the branch holds before anything is written.
    # (and, for --private, whether the repo is private).
    assert [name for name, _ in calls] == ["list_repo_files", "repo_info", "create_repo", "create_branch",
                                           "upload_folder", "list_repo_files", "create_commit"]
    kw = dict(calls)
    assert kw["create_repo"]["repo_type"] == "dataset" and kw["create_repo"]["private"] is True
    assert kw["create_branch"]["branch"] == "v2"
    up = kw["upload_folder"]
    assert up["repo_type"] == "dataset" and up["revision"] == "v2" and Path(up["folder_path"]) == src
    # The patterns select exactly the data files from what is in the folder (as huggingface_hub filters).
    on_disk = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    chosen = filter_repo_objects(on_disk, allow_patterns=up["allow_patterns"], ignore_patterns=up["ignore_patterns"])
    assert sorted(chosen) == sorted(["tokens.arrow"] + [f"shards/acts-{i:05d}.safetensors" for i in range(4)])
    ops = kw["create_commit"]["operations"]
    assert kw["create_commit"]["revision"] == "v2"
    adds = {op.path_in_repo: op for op in ops if type(op).__name__ == "CommitOperationAdd"}
    deletes = [op.path_in_repo for op in ops if type(op).__name__ == "CommitOperationDelete"]
    assert sorted(adds) == ["README.md", "manifest.json"] and deletes == ["shards/acts-00042.safetensors"]
    assert adds["README.md"].path_or_fileobj == plan.card.encode()
    assert adds["manifest.json"].path_or_fileobj == (src / "manifest.json").read_bytes()  # nothing to redact here
    assert plan.commit_url == Info.commit_url
    assert FAKE_TOKEN not in repr(calls)  # the token is left to huggingface_hub, never passed around


def test_push_of_a_cache_whose_shard_folder_is_a_link_uploads_every_shard(tmp_path, hf_home, monkeypatch):
    """``shards/`` moved to another disk and linked back: the uploader does not enter a linked folder, so
    the push published the manifest over no shards and said it succeeded. Now every shard goes up (through
    a folder of links), and a manifest is never committed over data files the repo lacks."""
    src = _cache(tmp_path / "c")
    (src / "normalization.safetensors").write_bytes(b"left over")  # norm_scale: a stray, not published
    (src / "shards").rename(tmp_path / "elsewhere")
    (src / "shards").symlink_to(tmp_path / "elsewhere")
    data = ["tokens.arrow"] + [f"shards/acts-{i:05d}.safetensors" for i in range(4)]
    hub = RecordingHub(monkeypatch, [])
    push_cache(src, "alice/toy-diff")
    assert sorted(hub.files) == sorted(data)  # each listed data file, and only those
    assert hub.names[-1] == "create_commit"

    # A mean_std cache whose manifest names no side file reads normalization.safetensors: it goes up.
    other = _cache(tmp_path / "ms", mean_std=True)
    _edit_manifest(other, lambda obj: obj["normalization"].pop("file"))
    hub = RecordingHub(monkeypatch, [])
    push_cache(other, "alice/ms")
    assert "normalization.safetensors" in hub.files

    lost = RecordingHub(monkeypatch, [], upload=False)  # an upload that leaves files out, whatever the cause
    with pytest.raises(HubError, match=r"left out 5 of the cache's 5 data files .* manifest was not committed"):
        push_cache(src, "alice/toy-diff")
    assert "create_commit" not in lost.names


# --------------------------------------------------------------------------------------------
# hf:// resolution against a local Hugging Face cache


def test_spec_parsing():
    assert parse_hub_spec("hf://alice/toy-diff") == ("alice/toy-diff", None)
    assert parse_hub_spec("hf://alice/toy.diff_2@v1") == ("alice/toy.diff_2", "v1")
    assert parse_hub_spec("hf://datasets/alice/toy-diff@refs/pr/3") == ("alice/toy-diff", "refs/pr/3")
    assert is_hub_spec("hf://a/b") and not is_hub_spec("caches/toy") and not is_hub_spec(Path("hf://a/b"))
    for bad in ("hf://alice", "hf://alice/", "hf://alice/toy@", "hf:///toy", "hf://a/b/c", "hf://a/b@x@y",
                "hf://alice/toy--diff", "hf://-alice/toy"):
        with pytest.raises(ValueError, match=r"hf://USER/NAME"):
            parse_hub_spec(bad)
        with pytest.raises(ValueError, match=r"hf://USER/NAME"):
            open_cache(bad)


def test_populated_cache_has_huggingface_hubs_own_layout(tmp_path, hf_home):
    from huggingface_hub import scan_cache_dir

    publish(hf_home / "hub", "alice/toy-diff", _cache(tmp_path / "c"), COMMIT_A, refs=("main", "v1"))
    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == ("alice/toy-diff", "dataset")
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT_A and set(rev.refs) == {"main", "v1"}
    assert {f.file_name for f in rev.files} >= {"manifest.json", "tokens.arrow", "README.md"}


def test_open_hf_cache_reads_the_right_rows(tmp_path, hf_home):
    src = _cache(tmp_path / "c", mean_std=True)
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)

    cache = open_cache("hf://alice/toy-diff")
    assert cache.dir == hf_home / "hub" / "datasets--alice--toy-diff" / "snapshots" / COMMIT_A
    assert cache.manifest.n_rows == sum(ROWS) and cache.n_shards == 4
    assert _rows(cache.dir) == _rows(src)
    for i in range(4):
        with cache.shard(i) as got, open_cache(src).shard(i) as want:
            assert torch.equal(got.acts, want.acts)
    assert cache.token_table().equals(open_cache(src).token_table())
    assert torch.equal(cache.normalization().mean_MPD, open_cache(src).normalization().mean_MPD)
    assert verify_cache("hf://alice/toy-diff").ok
    assert resolve_cache("hf://datasets/alice/toy-diff") == cache.dir


def test_max_shards_gives_a_consistent_partial_view(tmp_path, hf_home):
    src = _cache(tmp_path / "c", mean_std=True)
    # Only what a max_shards=2 download fetches is in the local cache: the rest was never downloaded.
    first_two = {"manifest.json", "README.md", "tokens.arrow", "normalization.safetensors",
                 "shards/acts-00000.safetensors", "shards/acts-00001.safetensors"}
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A, only=first_two)

    view = resolve_cache("hf://alice/toy-diff", max_shards=2)
    repo_dir = hf_home / "hub" / "datasets--alice--toy-diff"
    assert view == repo_dir / "crosscache-partial" / f"{COMMIT_A}-first2"
    cache = open_cache(view)
    man = cache.manifest
    assert cache.n_shards == 2 and man.n_rows == ROWS[0] + ROWS[1]
    assert man.extra["partial_of"] == {"repo": "alice/toy-diff", "revision": None, "commit": COMMIT_A,
                                       "n_shards": 4, "n_rows": sum(ROWS)}
    assert _rows(view) == shard_rows(src, [0, 1])
    assert verify_cache(view).ok  # checksums, token table, n_sequences: a whole cache in itself
    assert cache.normalization().method == "mean_std"
    assert "| shards | 2 |" in (view / "README.md").read_text()
    # Links into the HF cache, not copies; a second call reuses the view as is.
    assert (view / "shards" / "acts-00000.safetensors").is_symlink()
    stamp = (view / "manifest.json").stat().st_mtime_ns
    assert open_cache("hf://alice/toy-diff", max_shards=2).dir == view
    assert (view / "manifest.json").stat().st_mtime_ns == stamp
    # A damaged view (its blob gone) is rebuilt.
    (view / "tokens.arrow").unlink()
    assert resolve_cache("hf://alice/toy-diff", max_shards=2) == view and (view / "tokens.arrow").is_file()
    # The whole cache is not there: asking for it says what is missing and how to fix it.
    with pytest.raises(HubError, match=r"acts-00002\.safetensors.*HF_HUB_OFFLINE=1"):
        open_cache("hf://alice/toy-diff")
    # A partial view is not a cache to publish.
    with pytest.raises(CacheError, match="partial download"):
        push_cache(view, "bob/copy", dry_run=True)


def test_a_download_opened_by_its_folder_says_to_download_again_not_to_harvest(tmp_path, hf_home):
    """A snapshot or partial view used by its path (a script that kept resolve_cache's folder) whose files
    the HF cache lost: the advice is to open the hf:// spec again, which downloads them, not to re-run a
    harvest the user never ran."""
    from shared.hub_spec import hub_download_of

    src = _cache(tmp_path / "c", mean_std=True)
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)
    snap = resolve_cache("hf://alice/toy-diff")
    view = resolve_cache("hf://alice/toy-diff", max_shards=2)
    spec = f"hf://alice/toy-diff@{COMMIT_A}"
    assert hub_download_of(snap / "shards" / "x") == (spec, None) and hub_download_of(view) == (spec, 2)
    assert hub_download_of(src) is None and hub_download_of(tmp_path / "datasets--a--b" / "snapshots") is None
    cache = open_cache(view)
    os.unlink(os.path.realpath(view / "shards" / "acts-00001.safetensors"))  # the blob, as delete-cache does
    for opened in (lambda: open_cache(view), lambda: open_cache(snap), lambda: cache.shard(1)):
        with pytest.raises(CacheError) as info:
            opened()
        msg = str(info.value)
        assert spec in msg and "re-harvest" not in msg and "re-run the harvest" not in msg, msg
    assert "--max-shards 2" in _message(lambda: open_cache(view)) and "--max-shards" not in _message(lambda: open_cache(snap))
    os.unlink(os.path.realpath(snap / "tokens.arrow"))
    assert spec in _message(lambda: Cache(snap, Manifest.load(snap)).token_table())
    norm = os.path.realpath(snap / "normalization.safetensors")
    Path(norm).write_bytes(b"damaged")
    assert spec in _message(lambda: Cache(snap, Manifest.load(snap)).normalization())
    out = subprocess.run([sys.executable, str(ROOT / "run_harvest.py"), "verify", str(view)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and f"to repair: it is part of a download of the first 2 shards of {spec}" in out.stderr
    assert "re-run the harvest" not in out.stderr
    # What downloading again does (offline here, so the blobs are put back by hand): the view is whole again.
    for rel in ("shards/acts-00001.safetensors", "tokens.arrow", "normalization.safetensors"):
        Path(os.path.realpath(snap / rel)).write_bytes((src / rel).read_bytes())
    assert verify_cache(resolve_cache("hf://alice/toy-diff", max_shards=2)).ok


def _message(call) -> str:
    with pytest.raises(CacheError) as info:
        call()
    return str(info.value)


def test_a_view_another_process_just_built_is_kept(tmp_path, hf_home, monkeypatch):
    """The race of two ranks opening one hf:// cache with max_shards: this process found no view, another
    built it meanwhile and reads it. This process re-checks under the build lock and keeps that view (it
    used to remove it: the other rank's shards vanished under it)."""
    import shared.hub_partial as hub_partial

    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)
    view = resolve_cache("hf://alice/toy-diff", max_shards=2)  # the other process's view
    inode = (view / "manifest.json").stat().st_ino
    real_ok, calls = hub_partial._view_ok, []

    def first_check_misses(*args):
        calls.append(1)
        return False if len(calls) == 1 else real_ok(*args)

    monkeypatch.setattr(hub_partial, "_view_ok", first_check_misses)
    assert resolve_cache("hf://alice/toy-diff", max_shards=2) == view
    assert len(calls) == 2 and (view / "manifest.json").stat().st_ino == inode  # not rebuilt
    assert not [p for p in view.parent.iterdir() if ".tmp-" in p.name]


def test_max_shards_at_least_the_shard_count_is_the_whole_cache(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)
    snap = hf_home / "hub" / "datasets--alice--toy-diff" / "snapshots" / COMMIT_A
    assert resolve_cache("hf://alice/toy-diff", max_shards=4) == snap
    assert resolve_cache("hf://alice/toy-diff", max_shards=99) == snap


def test_revision_picks_the_snapshot(tmp_path, hf_home):
    old = _cache(tmp_path / "old", seed=1, rows=[40, 40])
    new = _cache(tmp_path / "new", seed=2, rows=ROWS)
    publish(hf_home / "hub", "alice/toy-diff", old, COMMIT_A, refs=("v1",))
    publish(hf_home / "hub", "alice/toy-diff", new, COMMIT_B, refs=("main",))

    assert open_cache("hf://alice/toy-diff").manifest.n_rows == sum(ROWS)
    assert _rows(open_cache("hf://alice/toy-diff@v1").dir) == _rows(old)
    assert _rows(open_cache(f"hf://alice/toy-diff@{COMMIT_A}").dir) == _rows(old)
    assert _rows(open_cache(f"hf://alice/toy-diff@{COMMIT_B}").dir) == _rows(new)
    view = resolve_cache("hf://alice/toy-diff@v1", max_shards=1)
    assert view.name == f"{COMMIT_A}-first1" and _rows(view) == shard_rows(old, [0])
    assert Manifest.load(view).extra["partial_of"]["revision"] == "v1"


def test_clear_errors(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    with pytest.raises(ValueError, match="max_shards must be"):
        resolve_cache("hf://alice/toy-diff", max_shards=0)
    with pytest.raises(ValueError, match="max_shards must be"):
        open_cache("hf://alice/toy-diff", max_shards=-1)
    with pytest.raises(ValueError, match="Hub caches"):
        open_cache(src, max_shards=2)
    assert resolve_cache(str(src)) == src and resolve_cache(src) == src
    # Not in the local cache, and offline: say so, and how to fix it.
    with pytest.raises(HubError, match=r"cannot download alice/nothing-here.*HF_HUB_OFFLINE=1.*HF_HUB_CACHE"):
        open_cache("hf://alice/nothing-here")
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)
    with pytest.raises(HubError, match=r"alice/toy-diff@v9.*no complete copy"):
        open_cache("hf://alice/toy-diff@v9")
    # A dataset repo that is not a cache (no manifest).
    publish(hf_home / "hub", "alice/other", src, COMMIT_B, only={"tokens.arrow"})
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache("hf://alice/other")
    report = verify_cache("hf://alice/nothing-here")
    assert not report.ok and "cannot download" in report.problems[0]


def test_verify_cli_and_no_token_in_any_file(tmp_path, hf_home):
    src = _cache(tmp_path / "c")
    publish(hf_home / "hub", "alice/toy-diff", src, COMMIT_A)
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_TOKEN": FAKE_TOKEN}
    ok = _run_cli(["verify", "hf://alice/toy-diff"], env)
    assert ok.returncode == 0 and f"{sum(ROWS):,} rows" in ok.stdout, ok.stderr
    missing = _run_cli(["verify", "hf://alice/missing"], env)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE=1" in missing.stderr
    dry = _run_cli(["push", str(src), "--repo", "alice/toy-diff", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    resolve_cache("hf://alice/toy-diff", max_shards=2)
    outputs = ok.stdout + ok.stderr + missing.stdout + missing.stderr + dry.stdout + dry.stderr
    assert FAKE_TOKEN not in outputs
    assert _files_containing(tmp_path, FAKE_TOKEN) == []


def test_shared_imports_without_huggingface_hub(tmp_path):
    src = _cache(tmp_path / "c")
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "import shared, shared.hub\n"
        f"c = shared.open_cache({str(src)!r}); assert c.n_shards == 4\n"
        f"assert shared.hub.push_cache({str(src)!r}, 'alice/x', dry_run=True).n_rows == {sum(ROWS)}\n"
        "try:\n    shared.open_cache('hf://alice/x')\n"
        "except ImportError as e:\n    print('pip install huggingface_hub' in str(e))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
