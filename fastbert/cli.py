"""The `fastbert` command: `fastbert demo | prepare | pretrain | finetune | bench` (argparse → configs → the job)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from fastbert import options


def _demo(args: argparse.Namespace) -> int:
    from fastbert.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, device=args.device, repeats=args.repeats))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers >= 1:
        # tokenizers sizes its thread pool from this on first use, which is still ahead.
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    from fastbert.data import prepare_corpus

    data = prepare_corpus(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          lowercase=args.lowercase, workers=args.workers, vocab_sample=args.vocab_sample,
                          shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=True)
    if data.reused:
        print(f"{data.data_dir}: already prepared from the same inputs and settings (reused)")
    print(f"{data.data_dir}: {data.num_documents:,} documents, {data.num_sentences:,} sentences, "
          f"{data.num_tokens:,} tokens in {len(data.shards)} shard(s) of {data.token_dtype}")
    print(f"vocabulary: {data.vocab_size:,} tokens ({'uncased' if data.lowercase else 'cased'}), special ids "
          f"[PAD]={data.pad_id} [UNK]={data.unk_id} [CLS]={data.cls_id} [SEP]={data.sep_id} [MASK]={data.mask_id}")
    if data.replaced_bytes:
        print(f"warning: {data.replaced_bytes:,} undecodable byte sequence(s) in the input were replaced with U+FFFD",
              file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fastbert.benchmarks import runner

    return runner.main(args=args)


def _pretrain(args: argparse.Namespace) -> int:
    from fastbert.pretrain.config import PretrainConfig
    from fastbert.pretrain.trainer import pretrain

    result = pretrain(options.from_args(PretrainConfig, args))
    if not result.interrupted:
        return 0
    return 143 if result.signal == "SIGTERM" else 130  # 128 + the signal number, as shells report it


def _finetune(args: argparse.Namespace) -> int:
    from fastbert.finetune import FinetuneConfig, run_finetune

    run_finetune(options.from_args(FinetuneConfig, args))
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

    prepare = commands.add_parser("prepare", help="tokenize a corpus into memory-mapped shards for pre-training")
    prepare.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                         help="text files (one sentence per line, blank line between documents), .jsonl files "
                              "with a 'text' field, `datasets` folders, or 'builtin' (Python's own docs, offline)")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output folder")
    prepare.add_argument("--tokenizer", default=None, metavar="FILE",
                         help="vocab.txt, tokenizer.json or a folder with one (default: train a WordPiece vocabulary)")
    prepare.add_argument("--vocab-size", type=int, default=30522, help="size of the trained vocabulary")
    case = prepare.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=None,
                      help="lower-case the text (default when training a vocabulary)")
    case.add_argument("--cased", dest="lowercase", action="store_false", help="keep the case")
    prepare.add_argument("--workers", type=int, default=None,
                         help="processes that split and tokenize the documents, and threads that train the "
                              "vocabulary (default: all cores); the output is the same bytes whatever the number")
    prepare.add_argument("--vocab-sample", type=int, default=None, metavar="LINES",
                         help="train the vocabulary on a fixed uniform sample of this many lines (default: all)")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard file")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an output folder prepared from other inputs or settings")
    prepare.set_defaults(run=_prepare)

    from fastbert.pretrain.config import PretrainConfig

    pretrain = commands.add_parser("pretrain", help="pre-train BERT (masked-LM, or MLM + NSP); no arguments: bert-tiny on the "
                                                    "built-in corpus on this machine for a few minutes")
    options.add_options(pretrain, PretrainConfig)
    pretrain.set_defaults(run=_pretrain)

    from fastbert.benchmarks.runner import add_arguments  # argparse only: no torch work at import

    bench = commands.add_parser("bench", help="run the benchmark suite (CSV + markdown + plot)")
    add_arguments(bench)
    bench.set_defaults(run=_bench)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a BERT checkpoint for text classification on CSV/TSV/JSONL files",
        description="Train a classifier on the checkpoint's encoder, report eval accuracy per epoch and save a "
                    "directory that transformers loads (BertForSequenceClassification).")
    from fastbert.finetune import FinetuneConfig

    options.add_options(finetune, FinetuneConfig)
    finetune.set_defaults(run=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastbert.backend import BackendUnavailableError  # after parsing: --help needs no torch

    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, BackendUnavailableError) as err:
        # Bad input is reported as one line, not a traceback.
        print(f"fastbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk, a read-only folder, ...: what failed and where, in one line.
        where = f": {err.filename}" if err.filename else ""
        print(f"fastbert {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # StopNow (pretrain: a signal during set-up or a second one) carries the signal; Ctrl-C is SIGINT.
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"fastbert {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 128 + signum  # as shells report a process a signal ended


if __name__ == "__main__":
    sys.exit(main())
