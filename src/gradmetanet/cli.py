"""The `gradmetanet` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmetanet", description="Learning on the gradients of neural networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="capture the decomposed gradients of a digits MLP and report the cost")
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_capture_demo
        run_capture_demo(batch_size=args.batch_size, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
