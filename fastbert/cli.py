"""The `fastbert` command: `fastbert demo | finetune | ...` (argparse → dataclass configs → the job)."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from fastbert.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, device=args.device, repeats=args.repeats))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from fastbert.finetune import FinetuneConfig, run_finetune

    run_finetune(FinetuneConfig(
        model=args.model, train=args.train, eval=args.eval, output=args.output, text_col=args.text_col,
        text_pair_col=args.text_pair_col, label_col=args.label_col, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision, device=args.device,
        seed=args.seed, max_steps=args.max_steps,
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="Fast BERT pre-training and fused BERT layers.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="encode a few sentences with a real BERT and print shapes and timing")
    demo.add_argument("--model", default=None,
                      help="checkpoint directory or preset name (default: the MiniLM checkpoint if installed)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda")
    demo.add_argument("--repeats", type=int, default=10, help="timed forward passes")
    demo.set_defaults(run=_demo)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a BERT checkpoint for text classification on CSV/TSV/JSONL files",
        description="Train a classifier on the checkpoint's encoder, report eval accuracy per epoch and save a "
                    "directory that transformers loads (BertForSequenceClassification).")
    finetune.add_argument("--model", required=True,
                          help="checkpoint directory (config.json, weights, tokenizer.json or vocab.txt)")
    finetune.add_argument("--train", required=True, help="training examples: .csv, .tsv (header line) or .jsonl")
    finetune.add_argument("--eval", required=True, help="evaluation examples, same format and columns")
    finetune.add_argument("--output", default=None, help="where to save the model (default: ./<model>-finetuned)")
    finetune.add_argument("--text-col", default="text", help="column with the text (default: text)")
    finetune.add_argument("--text-pair-col", default=None, help="column with the second text of a pair, if any")
    finetune.add_argument("--label-col", default="label", help="column with the label (default: label)")
    finetune.add_argument("--epochs", type=int, default=3)
    finetune.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW, linear schedule)")
    finetune.add_argument("--batch-size", type=int, default=32)
    finetune.add_argument("--seq-len", type=int, default=128, help="longest input in tokens; longer ones are cut")
    finetune.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="auto = bf16 autocast on a GPU that supports it, fp32 otherwise")
    finetune.add_argument("--device", default="auto", help="auto | cpu | cuda")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    finetune.set_defaults(run=_finetune)
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
