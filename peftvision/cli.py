"""`peftvision` command line. Parses arguments, then calls the library stages in order.

Heavy imports (torch, timm) happen inside the subcommands so that `peftvision --help` is instant.
A `PeftVisionError` becomes one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .errors import PeftVisionError


# ----------------------------------------------------------------------------- subcommands

def cmd_info(args: argparse.Namespace) -> None:
    """Parameter breakdown and adapter size of each method on a model (no weights are downloaded)."""
    import copy

    from rich.console import Console
    from rich.table import Table

    from .backbone import create_model
    from .config import method_options, parse_overrides
    from .freeze import param_report
    from .injection import inject
    from .methods import list_methods

    overrides = parse_overrides(args.set)
    base = create_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    methods = [args.method] if args.method else list_methods()
    table = Table(title=f"{args.model} ({args.num_classes} classes)")
    for col in ("method", "trainable", "method params", "head params", "% of total", "adapter size"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name in methods:
        model = inject(copy.deepcopy(base), name, **method_options(name, overrides))
        report = param_report(model)
        size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        table.add_row(
            name, f"{report.trainable:,}", f"{report.method_params:,}", f"{report.head_params:,}",
            f"{report.percent:.3f}%", _human_bytes(size),
        )
    Console().print(table)


def cmd_merge(args: argparse.Namespace) -> None:
    """Fold an adapter into its base and write a plain timm checkpoint."""
    from .backbone import model_spec
    from .export import load_adapter, save_merged

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    path = save_merged(model, args.output)
    spec = model_spec(model)
    kwargs = "".join(f", {k}={v!r}" for k, v in spec.kwargs.items())
    print(
        f"wrote {path}: load it with timm.create_model({spec.name.split('.')[0]!r}, "
        f"num_classes={model.num_classes}{kwargs}, checkpoint_path={str(path)!r})"
    )


def cmd_export(args: argparse.Namespace) -> None:
    """Write an adapter in another library's format (HF PEFT)."""
    from .export import export_peft, load_adapter

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    path = export_peft(model, args.output)
    print(f"wrote {path}: load it with peft.PeftModel.from_pretrained(timm_model, '{path}')")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- parser

def _adapter_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter.safetensors)")
    p.add_argument("--checkpoint", help="local weights file for the base model (default: download from the hub)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept base weights other than the adapter's")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="peftvision", description="Parameter-efficient fine-tuning of timm ViT and Swin models."
    )
    parser.add_argument("--version", action="version", version=f"peftvision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("info", help="parameter breakdown and adapter size per method", formatter_class=fmt)
    p.add_argument("--model", required=True, help="any timm model name")
    p.add_argument("--method", help="one method (default: all registered methods)")
    p.add_argument("--num-classes", type=int, default=100, help="size of the classifier head")
    p.add_argument("--checkpoint", help="local weights file (not needed for counting)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, e.g. lora.r=16")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge", help="fold a LoRA adapter into a plain timm checkpoint", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write an adapter in HF PEFT format", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--format", choices=["peft"], default="peft", help="target format")
    p.add_argument("--output", required=True, help="output directory")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        func(args)
    except PeftVisionError as e:
        print(f"peftvision {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftvision {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
