#!/usr/bin/env python
"""Stage 2 CLI: train a dictionary (crosscoder, transcoder, CLT, SAE) on an activation cache.

    python run_train.py --cache DIR --arch crosscoder --activation batchtopk --k 32 --latents 4096 \
        --steps N --batch-size B --lr X --out runs/NAME
    python run_train.py --config run.yaml [--flags that override it]
    python run_train.py --sweep sweep.yaml --cache DIR --out runs/sweep   # many dictionaries, one stream
    torchrun --nproc-per-node N run_train.py ...                           # DDP
    python run_train.py analyze RUN_DIR                                    # report on a trained run
    python run_train.py export-saelens RUN_DIR --out DIR                   # SAE/transcoder -> SAELens folder
    python run_train.py export-circuit-tracer RUN [RUN ...] --out DIR      # CLT/transcoder set -> circuit-tracer
    python run_train.py push RUN_DIR --repo USER/NAME [--dry-run]          # dictionary -> Hub model repo
    python run_train.py lm-eval RUN_DIR                                    # splice it in: the models' loss

Re-running the same command resumes from the newest checkpoint in --out.
Every flag is a field of ``train.config.TrainConfig``.
"""

from __future__ import annotations

import argparse
import os
import sys

from shared.config import add_dataclass_arguments, config_from_namespace, config_values, unknown_command
from train.config import TrainConfig


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="run_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig fields (flags override it)")
    parser.add_argument("--sweep", help="YAML/JSON sweep file (members: and/or grid:): train every member from one "
                                        "loader stream, each in <--out>/<name>")
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "analyze":  # run_train.py analyze RUN_DIR [flags]: report on a trained run
        from train.analysis import analyze_cli

        return analyze_cli(argv[1:])
    if argv and argv[0] == "export-saelens":  # run_train.py export-saelens RUN_DIR --out DIR: for sae_lens
        from train.export_saelens import export_saelens_cli

        return export_saelens_cli(argv[1:])
    if argv and argv[0] == "export-circuit-tracer":  # run_train.py export-circuit-tracer RUN [RUN ...] --out DIR
        from train.export_circuit_tracer import export_circuit_tracer_cli

        return export_circuit_tracer_cli(argv[1:])
    if argv and argv[0] == "lm-eval":  # run_train.py lm-eval RUN_DIR: what the LMs lose with it spliced in
        from train.lm_eval import lm_eval_cli

        return lm_eval_cli(argv[1:])
    if argv and argv[0] == "push":  # run_train.py push RUN_DIR --repo USER/NAME: share the dictionary on the Hub
        from train.hub_dictionary import push_cli

        return push_cli(argv[1:])
    if problem := unknown_command(argv, ["analyze", "lm-eval", "export-saelens", "export-circuit-tracer", "push"],
                                  "run_train.py", "trains"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = _train_parser().parse_args(argv)
    try:
        # A sweep's shared flags need not be a whole config (--activation batchtopk, k per member): each member is
        # checked once its overrides are applied.
        cfg = (config_values(TrainConfig, args, args.config) if args.sweep
               else config_from_namespace(TrainConfig, args, args.config))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from shared.cache_format import CacheError
    from shared.folder_lock import FolderLockError, exit_code_for
    from shared.shard_io import DiskFullError
    from train.distributed import DistributedTrainingError
    from train.sweep import expand_sweep
    from train.trainer import NonFiniteLossError, TrainingInterrupted, train_many

    try:
        cfgs = expand_sweep(args.sweep, cfg) if args.sweep else [cfg]
        results = train_many(cfgs)
    except FolderLockError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except (CacheError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # a checkpoint save: its message says what was kept and to re-run
        print(f"error: {e.strerror or e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except DistributedTrainingError as e:  # another rank died or hangs: its own output says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    for result in results:
        if int(os.environ.get("RANK", "0")) != 0:
            continue  # under torchrun only rank 0 reports
        if result.already_complete:
            print(f"{result.run_dir} already holds the finished run ({result.steps} steps): nothing to do. Delete "
                  "its export/ to export again, or use another --out to train again")
            continue
        ev = result.eval_metrics.get("eval/ev/overall")
        l0 = result.eval_metrics.get("eval/l0/mean")
        print(f"trained {result.steps} steps -> {result.run_dir}"
              + (f" (eval: explained variance {'n/a' if ev is None else f'{ev:.3f}'}, L0 {l0:.1f})"
                 if l0 is not None else ""))
        print(f"exported dictionary (raw activations): {result.run_dir / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
