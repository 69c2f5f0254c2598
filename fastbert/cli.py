"""The `fastbert` command: `fastbert demo | bench | ...` (argparse → configs → the job)."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from fastbert.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, device=args.device, repeats=args.repeats))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fastbert.benchmarks import runner

    return runner.main(args=args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="Fast BERT pre-training and fused BERT layers.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="encode a few sentences with a real BERT and print shapes and timing")
    demo.add_argument("--model", default=None,
                      help="checkpoint directory or preset name (default: the MiniLM checkpoint if installed)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda")
    demo.add_argument("--repeats", type=int, default=10, help="timed forward passes")
    demo.set_defaults(run=_demo)

    from fastbert.benchmarks.runner import add_arguments  # argparse only: no torch work at import

    bench = commands.add_parser("bench", help="run the benchmark suite (CSV + markdown + plot)")
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Bad input is reported as one line, not a traceback.
        print(f"fastbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastbert {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
