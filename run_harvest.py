#!/usr/bin/env python
"""Stage 1 CLI: harvest activations into a cache, verify one, or push one to the Hugging Face Hub.

    python run_harvest.py [--models ...] [--hooks ...] [--dataset ...] [--out DIR] ...
    python run_harvest.py verify DIR
    python run_harvest.py push DIR --repo USER/NAME [--private] [--revision R] [--force] [--dry-run]

With no arguments it harvests the default demo cache (toy pair on builtin:mixed).
Under ``torchrun --nproc-per-node N run_harvest.py ...`` N processes share the work (see
``harvest/distributed.py``).
Every flag is a field of ``harvest.HarvestConfig``; ``--config FILE.yaml`` loads them from a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harvest.config import HarvestConfig
from shared.config import add_dataclass_arguments, config_from_namespace, unknown_command

if TYPE_CHECKING:
    from shared.cache import VerifyReport


def _harvest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="run_harvest.py",
        description="Harvest aligned, normalized activations of one or more models into a cache. "
        "Subcommands: `verify DIR` checks a cache against its manifest; `push DIR --repo USER/NAME` "
        "uploads it to the Hugging Face Hub.",
    )
    parser.add_argument("--config", help="YAML or JSON file of HarvestConfig fields (flags override it)")
    add_dataclass_arguments(parser, HarvestConfig)
    return parser


def _verify(argv: list[str]) -> int:
    from shared.cache import verify_cache

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="run_harvest.py verify",
                                     description="Check every shard against the manifest.")
    parser.add_argument("cache", help="cache folder")
    parser.add_argument("--no-checksums", action="store_true", help="skip sha256 (sizes and headers only)")
    args = parser.parse_args(argv)
    report = verify_cache(args.cache, checksums=not args.no_checksums, progress=True)
    if report.ok:
        print(f"OK: {args.cache}: {report.n_shards} shard{'s' * (report.n_shards != 1)}, {report.n_rows:,} rows match the manifest")
        return 0
    print(f"FAILED: {args.cache}: {len(report.problems)} problem(s):", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    if not args.cache.startswith("hf://"):
        from shared.folder_lock import BUSY_EXIT_CODE, holder_summary

        if (holder := holder_summary(args.cache)) is not None:  # its problems may be work in progress
            print(f"note: a harvest ({holder}) is writing this cache now: verify again when it ends", file=sys.stderr)
            return BUSY_EXIT_CODE
        print(_repair_hint(Path(args.cache), report), file=sys.stderr)
    return 1


def _repair_hint(cache_dir: Path, report: VerifyReport) -> str:
    """How to repair a local cache: a re-run of its harvest rewrites what is missing; a folder of a Hub
    cache download is downloaded again instead. Shards written holding inf or NaN are intact: a re-run
    or a download writes the same bytes again, so only a new harvest with other dtypes mends them."""
    from shared.cache_format import Manifest
    from shared.hub_spec import rewrite_advice

    from harvest.rank_manifests import RANK_MANIFEST_GLOB

    if report.nonfinite_shards:  # the cache must be made again: mending the damaged shards gains nothing
        n, others = len(report.nonfinite_shards), len(report.problems) - len(report.nonfinite_shards)
        return (f"to repair: {n} shard(s) above are not damaged but were written holding inf or NaN, and re-running "
                "the harvest (or downloading the cache again) writes the same values: harvest again into a new folder "
                "with the dtype flags named above" + (f"; that also replaces what the other {others} problem(s) name"
                                                      if others else ""))

    if hub_fix := rewrite_advice(cache_dir, local=None):
        return f"to repair: {hub_fix}"

    try:
        command = _with_out(Manifest.load(cache_dir).created_by.get("command") or "", cache_dir)
    except Exception:  # noqa: BLE001 - no readable manifest: nothing to re-run
        return "to repair: harvest again into a new or empty folder" if cache_dir.is_dir() else "no such cache folder"
    if any(cache_dir.glob(RANK_MANIFEST_GLOB)):  # its shards so far are listed per rank, not in manifest.json
        how = f"`torchrun --nproc-per-node N {command}`" if command.startswith("run_harvest.py") else "its command"
        return (f"an interrupted multi-process harvest (the shards written so far are listed in {RANK_MANIFEST_GLOB}): "
                f"to finish it, resume it under torchrun with the same flags, {how} (any N, 1 too); a plain "
                "`python run_harvest.py` refuses it")
    return ("to repair: delete each shard reported corrupted (its sha256 or header), then re-run the harvest "
            f"command that made the cache{f' (`python {command}`)' if command.startswith('run_harvest.py') else ''}: it rewrites missing and "
            "truncated shards, the token table and tokenizer.json, byte for byte")


def _with_out(command: str, cache_dir: Path) -> str:
    """The recorded harvest command writing into ``cache_dir``, the folder checked: a copied or moved cache's
    command names the folder it was harvested into, which a re-run would "repair" instead."""
    import shlex

    if not command.startswith("run_harvest.py"):
        return command
    words, kept, skip = command.split(" "), [], False  # recorded as the arguments joined by spaces
    for word in words:
        if skip:
            skip = False
        elif word == "--out":
            skip = True
        elif not word.startswith("--out="):
            kept.append(word)
    return " ".join(kept + ["--out", shlex.quote(str(cache_dir))])


def _push(argv: list[str]) -> int:
    from shared.cache_format import CacheError
    from shared.folder_lock import FolderBusyError, exit_code_for
    from shared.hub import push_cache
    from shared.hub_push_common import add_push_options, print_push_result

    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="run_harvest.py push",
        description="Verify a cache and upload it to a Hugging Face dataset repo (resumable: re-run to resume), "
        "with a generated dataset card. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("cache", help="cache folder (or hf://USER/NAME[@REV])")
    add_push_options(parser, repo_type="dataset", thing="cache", dry_run_checks="verify")
    args = parser.parse_args(argv)
    try:
        plan = push_cache(args.cache, args.repo, private=args.private, revision=args.revision,
                          dry_run=args.dry_run, progress=True, force=args.force)
    except FolderBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except (CacheError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return print_push_result(plan, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    if argv and argv[0] == "push":
        return _push(argv[1:])
    if problem := unknown_command(argv, ["verify", "push"], "run_harvest.py", "harvests"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = _harvest_parser().parse_args(argv)
    try:
        cfg = config_from_namespace(HarvestConfig, args, args.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from harvest.harvester import harvest
    from harvest.models import HarvestInputError
    from harvest.process_group import DistributedHarvestError
    from shared.cache_format import CacheError
    from shared.folder_lock import FolderLockError, exit_code_for
    from shared.shard_io import DiskFullError

    try:
        harvest(cfg)
    except FolderLockError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except (HarvestInputError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # its message says what to free and that a re-run resumes
        print(f"error: {e.strerror or e}", file=sys.stderr)
        return 2
    except DistributedHarvestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C (under torchrun every rank gets it): one line each, not a traceback
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}interrupted: the shards written so far are kept; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
