"""`dsv3` command line: each verb lives in its own module, which registers its sub-parser here.

A verb module exposes ``register(subparsers)``; it adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace`` and returning an exit code (or None). User errors raise ``UserError``: they are
printed as one line and the process exits with code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from dsv3.errors import UserError

# (module, description) in the order `dsv3 --help` lists them.
VERB_MODULES = [
    "dsv3.data.cli",      # prepare
    "dsv3.train.cli",     # train, eval
    "dsv3.infer.cli",     # generate
    "dsv3.hf_cli",        # export, import
    "dsv3.train.plot",    # plot
    "dsv3.plan.cli",      # plan
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every verb whose module is importable."""
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="Train DeepSeek-V3-architecture models: prepare data, train, evaluate, generate, export, plan.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("dsv3"):
                continue  # a verb not built yet
            raise
        module.register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, load every CUDA kernel when CUDA starts: with lazy loading, the first launch of a
        # kernel while an NCCL receive spins on the GPU blocked the host (pipeline runs hung on 2 H200s).
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    parser = build_parser()
    if not argv:
        argv = ["train"]  # the embedded default: `dsv3` alone is `dsv3 train`
    args = parser.parse_args(argv)
    if os.environ.get("DSV3_STACK_DUMP_S"):  # debugging a hang: print every thread's stack after N s, then exit
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["DSV3_STACK_DUMP_S"]), exit=True)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
