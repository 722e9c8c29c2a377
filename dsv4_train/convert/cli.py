"""Command line of the converter (one process, or several under torchrun).

  python -m dsv4_train.convert import SRC OUT [parallel.tp=2 ...] [--dtype bf16|fp32]
  python -m dsv4_train.convert export CKPT OUT --format hf|official [--dtype bf16|fp32|fp8]
         [--experts fp4|fp8] [--block 128] [--scale-format ue8m0|f32] [--like SRC]
  python -m dsv4_train.convert verify SRC CKPT

Bad input exits 2 with one message naming the file or tensor; nothing is left at OUT.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv4_train.convert",
                                     description="Convert DeepSeek-V4 checkpoints to and from dsv4-train's format.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="release / transformers safetensors -> a dsv4-train model checkpoint")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("overrides", nargs="*", help="parallel.* settings of the target layout, checked before writing")
    imp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                     help="storage of floating tensors (the release's fp32 ones stay fp32); bf16 holds FP8/FP4 exactly")
    exp = sub.add_parser("export", help="a dsv4-train checkpoint -> safetensors")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    exp.add_argument("--format", default="hf", choices=["hf", "official"])
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp8"])
    exp.add_argument("--experts", default=None, choices=["fp4", "fp8"], help="routed experts' format (official only)")
    exp.add_argument("--block", type=int, default=128, help="FP8 block size")
    exp.add_argument("--scale-format", default="ue8m0", choices=["ue8m0", "f32"])
    exp.add_argument("--max-shard-gb", type=float, default=4.0)
    exp.add_argument("--like", default=None, metavar="SRC",
                     help="keep this release checkpoint's block scales where they still encode a weight exactly")
    ver = sub.add_parser("verify", help="compare every tensor of CKPT with SRC")
    ver.add_argument("src")
    ver.add_argument("ckpt")
    for command in (imp, exp, ver):
        command.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (0: off)")
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may follow the options
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown or (overrides and args.command != "import"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if args.command == "import":
        args.overrides = list(args.overrides) + overrides
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl|deprecated).*")
    try:
        if args.command == "import":
            from dsv4_train.convert.importer import import_checkpoint

            report = import_checkpoint(args.src, args.out, overrides=args.overrides, dtype=args.dtype,
                                       progress_every=args.progress_every)
            if _rank() == 0:
                print(f"imported {args.src} -> {args.out}: {report['mapped']} model tensors, dequantised "
                      f"{len(report['dequantized']['fp8'])} FP8 and {len(report['dequantized']['fp4'])} FP4 weights; "
                      f"MTP {'left to initialise on load (not in the source)' if report['mtp_initialised_on_load'] else 'imported'}; "
                      f"{report['rank_bytes'] / 2**30:.3f} GiB written by rank 0 in {report['seconds']:.1f} s; "
                      f"peak RSS per rank {[round(r / 2**20) for r in report['peak_rss']]} MiB (rank 0 held "
                      f"{report['rss_before'] / 2**20:.0f} MiB before converting; largest tensor "
                      f"{report['largest_tensor_bytes'] / 2**20:.0f} MiB)")
        elif args.command == "export":
            from dsv4_train.convert.exporter import export_checkpoint

            report = export_checkpoint(args.ckpt, args.out, fmt=args.format, dtype=args.dtype, experts=args.experts,
                                       block=args.block, scale_format=args.scale_format,
                                       max_shard_bytes=int(args.max_shard_gb * 2**30), like=args.like,
                                       progress_every=args.progress_every)
            if _rank() == 0:
                print(f"exported {args.ckpt} -> {args.out} ({args.format}, {args.dtype}): {report['tensors']} tensors in "
                      f"{report['shards']} shard(s), MTP {'included' if report['mtp'] else 'not included'}, "
                      f"{report['seconds']:.1f} s; peak RSS per rank {[round(r / 2**20) for r in report['peak_rss']]} MiB "
                      f"(rank 0 held {report['rss_before'] / 2**20:.0f} MiB before exporting)")
        else:
            from dsv4_train.convert.verify import format_report, verify

            report = verify(args.src, args.ckpt)
            if _rank() == 0:
                print(format_report(report))
            return 0 if report["ok"] else 1
    except ValueError as error:  # ConvertError and the format checks: a clear refusal, no traceback
        print(f"convert {args.command}: {error}", file=sys.stderr)
        return 2
    finally:
        # Tear the process group down before the interpreter does: gloo's threads destroyed during
        # interpreter shutdown occasionally abort the process ("terminate called without an active
        # exception", exit -6) after a complete export.
        import torch.distributed

        if torch.distributed.is_initialized():  # a refusal before start-up has nothing to tear down
            from dsv4_train.runtime.distributed import shutdown

            shutdown()
    return 0
