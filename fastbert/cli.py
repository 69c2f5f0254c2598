"""The `fastbert` command: `fastbert demo | prepare | pretrain | finetune | bench` (argparse → configs → the job)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys


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
                          lowercase=args.lowercase, workers=args.workers, shard_tokens=args.shard_tokens,
                          overwrite=args.overwrite, progress=True)
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
    from fastbert.pretrain.trainer import PretrainConfig, pretrain

    fields = {f for f in PretrainConfig.__dataclass_fields__}
    config = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = pretrain(config)
    if not result.interrupted:
        return 0
    return 143 if result.signal == "SIGTERM" else 130  # 128 + the signal number, as shells report it


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from fastbert.pretrain.trainer import PretrainConfig

    d = PretrainConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="preset name (bert-tiny, bert-base-uncased, ...) or a checkpoint dir")
    a("--corpus", nargs="+", default=None, help="text/.jsonl files or dirs, a datasets dir, or 'builtin' (default)")
    a("--data", default=None, help="a data dir made by `fastbert prepare` (instead of --corpus)")
    a("--out", default=d.out, help="output dir: data/, checkpoints/, metrics.jsonl, final/")
    a("--max-steps", type=int, default=d.max_steps)
    a("--batch-size", type=int, default=d.batch_size, help="sequences per device per micro-step")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--seq-len", type=int, default=d.seq_len)
    a("--lr", type=float, default=None, help="peak learning rate (default 2e-2 LAMB: tuned for bert-tiny at batch 32; 5e-4 AdamW)")
    a("--warmup", type=float, default=d.warmup, help="< 1: fraction of max steps; >= 1: steps")
    a("--schedule", choices=("linear", "poly"), default=d.schedule)
    a("--optimizer", choices=("lamb", "adamw"), default=d.optimizer)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--clip", type=float, default=d.clip, help="global gradient-norm clip (0: off)")
    a("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=d.precision,
      help="auto: bf16 on GPU (fp16 + GradScaler where bf16 is missing), fp32 on CPU")
    a("--seed", type=int, default=d.seed)
    a("--log-every", type=int, default=d.log_every)
    a("--save-every", type=int, default=d.save_every)
    a("--keep", type=int, default=d.keep, help="checkpoints to keep")
    a("--eval-every", type=int, default=d.eval_every)
    a("--eval-batches", type=int, default=d.eval_batches, help="held-out batches per eval (collated once)")
    a("--eval-fraction", type=float, default=d.eval_fraction,
      help="fraction of the documents held out for eval (spread over the corpus, never trained on)")
    a("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    a("--stop-at", type=int, default=None,
      help="stop after this step with a checkpoint (for time-limited jobs); --resume continues to --max-steps")
    a("--whole-word-mask", action="store_true")
    a("--packing", action="store_true", help="pack several pairs per row (needs the unpadded encoder)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--backend", choices=("auto", "triton", "torch"), default=d.backend)
    a("--device", choices=("auto", "cuda", "cpu"), default=d.device)
    a("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    a("--vocab-size", type=int, default=d.vocab_size, help="WordPiece size when a vocabulary is trained")
    a("--tokenizer", default=None, help="vocab.txt or tokenizer.json to use instead of training one")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")

def _finetune(args: argparse.Namespace) -> int:
    from fastbert.finetune import FinetuneConfig, run_finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    run_finetune(FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from fastbert.device import DEVICES_HELP, PRECISIONS
    from fastbert.finetune import FinetuneConfig

    # The defaults are FinetuneConfig's (it has required fields, so read them off the dataclass).
    d = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
    a = parser.add_argument
    a("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json or vocab.txt)")
    a("--train", required=True, help="training examples: .csv, .tsv (header line) or .jsonl")
    a("--eval", required=True, help="evaluation examples, same format and columns")
    a("--output", default=d["output"], help="where to save the model (default: ./<model>-finetuned)")
    a("--text-col", default=d["text_col"], help=f"column with the text (default: {d['text_col']})")
    a("--text-pair-col", default=d["text_pair_col"], help="column with the second text of a pair, if any")
    a("--label-col", default=d["label_col"], help=f"column with the label (default: {d['label_col']})")
    a("--epochs", type=int, default=d["epochs"])
    a("--lr", type=float, default=d["lr"], help="peak learning rate (AdamW, linear schedule)")
    a("--warmup-ratio", type=float, default=d["warmup_ratio"], help="fraction of the steps spent warming up")
    a("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay (not on biases/LayerNorm)")
    a("--batch-size", type=int, default=d["batch_size"])
    a("--seq-len", type=int, default=d["seq_len"], help="longest input in tokens; longer ones are cut")
    a("--precision", default=d["precision"], choices=PRECISIONS,
      help="auto: bf16 autocast on a GPU that has it, fp16 + GradScaler on one that has not, fp32 on the CPU")
    a("--device", default=d["device"], help=DEVICES_HELP)
    a("--seed", type=int, default=d["seed"])
    a("--max-steps", type=int, default=d["max_steps"], help="stop after this many optimizer steps")


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
    prepare.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard file")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an output folder prepared from other inputs or settings")
    prepare.set_defaults(run=_prepare)

    pretrain = commands.add_parser("pretrain", help="pre-train BERT (MLM + NSP); no arguments: bert-tiny on the "
                                                    "built-in corpus on this machine for a few minutes")
    _add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)

    from fastbert.benchmarks.runner import add_arguments  # argparse only: no torch work at import

    bench = commands.add_parser("bench", help="run the benchmark suite (CSV + markdown + plot)")
    add_arguments(bench)
    bench.set_defaults(run=_bench)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a BERT checkpoint for text classification on CSV/TSV/JSONL files",
        description="Train a classifier on the checkpoint's encoder, report eval accuracy per epoch and save a "
                    "directory that transformers loads (BertForSequenceClassification).")
    _add_finetune_arguments(finetune)
    finetune.set_defaults(run=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        # Bad input is reported as one line, not a traceback.
        print(f"fastbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk, a read-only folder, ...: what failed and where, in one line.
        where = f": {err.filename}" if err.filename else ""
        print(f"fastbert {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastbert {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
