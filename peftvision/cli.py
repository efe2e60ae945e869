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

    from rich.table import Table

    from .backbones.backbone import create_model
    from .methods import default_lr, list_methods
    from .methods.freeze import param_report
    from .methods.inject import inject
    from .training.config import method_options, parse_overrides
    from .ui import print_wide

    overrides = parse_overrides(args.set)
    base = create_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    methods = [args.method] if args.method else list_methods()
    table = Table(title=f"{args.model} ({args.num_classes} classes)")
    for col in ("method", "trainable", "method params", "head params", "% of total", "adapter size", "default lr"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name in methods:
        model = inject(copy.deepcopy(base), name, **method_options(name, overrides))
        report = param_report(model)
        size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        table.add_row(
            name, f"{report.trainable:,}", f"{report.method_params:,}", f"{report.head_params:,}",
            f"{report.percent:.3f}%", _human_bytes(size), f"{default_lr(name, args.model):g}",
        )
    print_wide(table)


def cmd_merge(args: argparse.Namespace) -> None:
    """Fold an adapter into its base and write a plain timm checkpoint."""
    from .adapters.io import load_adapter, preprocessing, save_merged
    from .backbones.backbone import model_spec

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    path = save_merged(model, args.output)
    spec = model_spec(model)
    create = [repr(spec.name.split(".")[0]), f"num_classes={model.num_classes}",
              *(f"{k}={v!r}" for k, v in spec.kwargs.items()), f"checkpoint_path={str(path)!r}"]
    transform = [f"{k}={v!r}" for k, v in preprocessing(model).items()]
    print(f"wrote {path}: a plain timm checkpoint; load it and preprocess as in training with")
    print(_call("  model = timm.create_model", create))
    print(_call("  transform = timm.data.create_transform", transform))


def _call(head: str, args: list[str], width: int = 100) -> str:
    """`head(a, b, ...)` as Python source, wrapped under the open parenthesis to fit `width` columns."""
    import textwrap

    indent = " " * (len(head) + 1)
    return textwrap.fill(", ".join(args) + ")", width=width, initial_indent=head + "(", subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def cmd_export(args: argparse.Namespace) -> None:
    """Write an adapter in another library's format: HF PEFT, a timm model folder, or ONNX."""
    from .adapters.card import read_metrics
    from .adapters.hub import is_hub_source
    from .adapters.io import load_adapter

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    metrics = None if is_hub_source(args.adapter) else read_metrics(args.adapter)
    if args.format == "peft":
        from .adapters.peft import export_peft

        path = export_peft(model, args.output, metrics)
        print(f"wrote {path}: load it with peft.PeftModel.from_pretrained(timm_model, '{path}')")
    elif args.format == "timm":
        from .adapters.timm import export_timm

        path = export_timm(model, args.output, metrics)
        print(f"wrote {path}: a timm model folder (config.json, model.safetensors, README.md); load it with")
        print(f"  timm.create_model('local-dir:{path}', pretrained=True), or push it with --format timm")
    else:
        from .adapters.onnx import INPUT_NAME, export_onnx

        path = export_onnx(model, args.output)
        print(f"wrote {path}: checked in ONNX Runtime; input {INPUT_NAME} (batch, C, H, W), preprocessed as")
        print("  the file's metadata says (preprocessing, label_names); onnxruntime.InferenceSession(path)")


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a backbone with one PEFT method and keep the best-on-validation adapter."""
    from .training.config import build_config, resume_config
    from .training.finetune import finetune

    flags = {name: getattr(args, name) for name in args.config_fields}
    if args.resume:
        finetune(resume_config(args.resume, flags, recipe=args.recipe, sets=args.set), resume=True)
    else:
        finetune(build_config(args.recipe, args.set, flags))


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy of a trained adapter on a dataset split, preprocessed as in training."""
    import json

    from .adapters.io import load_adapter
    from .data import build_loader, load_task, make_transform
    from .errors import DataError
    from .methods.freeze import get_state
    from .training.config import TrainConfig
    from .training.evaluate import evaluate_model
    from .ui import progress_bar

    cfg = TrainConfig.from_dict({k: getattr(args, k) for k in args.config_fields if getattr(args, k) is not None})
    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint).eval()
    task = load_task(args.dataset, seed=cfg.seed)
    if task.num_classes != model.num_classes:
        raise DataError(f"{args.dataset} has {task.num_classes} classes, the adapter's head {model.num_classes}")
    transform = make_transform(model, train=False, resize=get_state(model).resize)
    loader = build_loader(task.dataset(args.split, transform), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    with progress_bar(f"evaluating on {args.split} ({len(loader.dataset):,} images)", len(loader)) as tick:
        metrics = evaluate_model(model, loader, task.num_classes, on_batch=tick)
    # indented: still one JSON document for scripts, and it fits a terminal
    print(json.dumps({"adapter": str(args.adapter), "dataset": args.dataset, "split": args.split, **metrics}, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    """Top-k classes, with names, for image files."""
    import torch

    from .adapters.io import load_adapter
    from .data import make_transform, open_image
    from .data.images import decode_size
    from .data.labels import format_top_k, top_k
    from .methods.freeze import get_state

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint).eval()
    names = get_state(model).class_names
    transform = make_transform(model, train=False, resize=get_state(model).resize)
    for path in args.images:
        x = transform(open_image(path, size=decode_size(transform))).unsqueeze(0)  # decoded as `serve` does
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        print(f"{path}: {format_top_k(top_k(probs, names, args.top_k))}")


def cmd_explain(args: argparse.Namespace) -> None:
    """Heat maps of where a model looks, one PNG per image; with --compare-base, the base's beside it."""
    from pathlib import Path

    from .adapters.io import load_adapter
    from .backbones.backbone import load_model
    from .data import make_transform, open_image
    from .errors import ConfigError
    from .explain import base_of, display_image, explain, figure, top_classes
    from .files import save_png
    from .methods.freeze import get_state

    if (args.adapter is None) == (args.model is None):
        raise ConfigError("give exactly one of --adapter DIR and --model NAME")
    if args.compare_base and args.adapter is None:
        raise ConfigError("--compare-base compares an adapter with its base: give --adapter DIR")
    images = [(Path(p), open_image(p)) for p in args.images]  # a bad file fails before any model loads
    if args.adapter:
        model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    else:
        model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    model.eval()
    base = base_of(model, args.checkpoint) if args.compare_base else None
    state = get_state(model)
    names = state.class_names if state else None
    transform = make_transform(model, train=False, resize=state.resize if state else "crop")
    options = dict(mode=args.mode, block=args.block, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    used: set[str] = set()
    for path, image in images:
        x = transform(image).unsqueeze(0)  # (1, 3, H, W)
        e = explain(model, x, **options)
        e_base = explain(base, x, **options) if base is not None else None
        fig = figure(display_image(x[0], model), e, e_base, names, title=path.name)
        stem, n = path.stem, 1
        while stem in used:  # two photos named alike in different folders
            stem, n = f"{path.stem}-{n}", n + 1
        used.add(stem)
        out = Path(args.output) / f"{stem}.png"
        save_png(out, fig)
        import matplotlib.pyplot as plt  # after `figure` chose the Agg backend

        plt.close(fig)
        prompts = f", prompts get {sum(e.prompt_share) / len(e.prompt_share):.0%}" if e.prompt_share else ""
        print(f"wrote {out}: {e.mode} block {e.block}, top-1 {top_classes(e.logits[0], names, 1)}{prompts}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Every method on every task, same protocol; rerunning resumes."""
    from .compare.jobs import CompareConfig
    from .compare.plan import compare
    from .training.config import from_values

    cc = from_values(CompareConfig, {k: getattr(args, k) for k in args.config_fields if getattr(args, k) is not None})
    compare(cc)
    print(f"results in {cc.output}: results.csv, results.json, summary.md, accuracy_vs_params.png, per_task.png")


def cmd_serve(args: argparse.Namespace) -> None:
    """Many adapters over one frozen backbone, batched together, over HTTP."""
    from .serving.config import ServeConfig
    from .serving.http import serve

    serve(ServeConfig.from_flags({k: getattr(args, k) for k in args.config_fields}))


def cmd_push(args: argparse.Namespace) -> None:
    """Upload an adapter directory, with its model card, to a Hugging Face Hub model repo."""
    from .adapters.publish import push

    url = push(args.adapter, args.repo, format=args.format, checkpoint=args.checkpoint,
               ignore_fingerprint=args.ignore_fingerprint, private=args.private, revision=args.revision,
               commit_message=args.commit_message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed to {url}")
    if args.format == "timm":
        print(f"load it with timm.create_model('hf-hub:{args.repo}{at}', pretrained=True)")
    elif args.format == "peft":
        print(f"load it with peft.PeftModel.from_pretrained(timm_model, '{args.repo}'"
              + (f", revision='{args.revision}')" if args.revision else ")"))
    else:
        print(f"load it with --adapter hf:{args.repo}{at} (any command), or peftvision.load_adapter")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- parser

ADAPTER_HELP = "adapter directory (adapter_config.json + adapter.safetensors), or hf:USER/NAME[@REVISION] on the hub"


def _adapter_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
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

    p = sub.add_parser("finetune", help="fine-tune a backbone with a PEFT method")
    from .training.config import add_config_flags

    fields = add_config_flags(p)
    p.add_argument("--recipe", help="YAML file with the same keys as these flags (flags override it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config key, or a method option as METHOD.OPTION=VALUE (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (with --epochs: extend it)")
    p.set_defaults(func=cmd_finetune, config_fields=fields)

    from .compare.jobs import CompareConfig

    p = sub.add_parser("compare", help="compare methods on a task suite (VTAB-1k protocol)")
    p.set_defaults(config_fields=add_config_flags(p, CompareConfig))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="accuracy of an adapter on a dataset split", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--dataset", required=True, help="dataset spec, as for finetune")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.set_defaults(func=cmd_eval, config_fields=add_config_flags(p, only=("seed", "batch_size", "num_workers")))

    p = sub.add_parser("predict", help="top-k classes for image files", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_predict)

    # no defaults formatter: most defaults here are "decided from the model", which it would print as None
    p = sub.add_parser("explain", help="heat maps of where a model looks (attention, rollout, Grad-CAM)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--model", help="a plain timm model instead of an adapter (e.g. with a merged --checkpoint)")
    p.add_argument("--checkpoint", help="local weights: the adapter's base, or --model's complete weights")
    p.add_argument("--num-classes", type=int, help="--model's head size (default: the checkpoint's)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept base weights other than the adapter's")
    p.add_argument("--output", default="explanations",
                   help="directory for the PNGs, <image name>.png (default: explanations)")
    p.add_argument("--mode", choices=["rollout", "attention", "gradcam"],
                   help="rollout / attention: ViT family; gradcam: any (default: rollout for ViT, gradcam for Swin)")
    p.add_argument("--block", type=int, help="attention / gradcam: that block; rollout: up to it (default: last)")
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean",
                   help="how rollout and attention combine heads (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="rollout: fraction of the lowest attention entries zeroed per block (default: 0)")
    p.add_argument("--compare-base", action="store_true", help="also the base model's map and the difference")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("info", help="parameter breakdown and adapter size per method", formatter_class=fmt)
    p.add_argument("--model", required=True, help="any timm model name")
    p.add_argument("--method", help="one method (default: all registered methods)")
    p.add_argument("--num-classes", type=int, default=100, help="size of the classifier head")
    p.add_argument("--checkpoint", help="local weights file (not needed for counting)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option, as METHOD.OPTION=VALUE")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge", help="fold an adapter into a plain timm checkpoint (methods that can merge)", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write an adapter for HF PEFT, timm or ONNX Runtime", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--format", choices=["peft", "timm", "onnx"], default="peft",
                   help="peft: HF PEFT adapter directory; timm: merged timm model folder (methods that merge); "
                        "onnx: one .onnx file (merged, or as it runs for methods that cannot merge)")
    p.add_argument("--output", required=True, help="output directory (peft, timm) or file (onnx: FILE.onnx)")
    p.set_defaults(func=cmd_export)

    from .serving.config import ServeConfig

    p = sub.add_parser("serve", help="serve many adapters over one backbone over HTTP")
    p.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=DIR",
                   help="an adapter to serve as NAME, DIR a directory or hf:USER/NAME[@REVISION] (repeatable)")
    p.set_defaults(func=cmd_serve, config_fields=["adapters", *add_config_flags(p, ServeConfig)])

    p = sub.add_parser("push", help="upload an adapter and its model card to the Hugging Face Hub")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (a finetune run, or save_adapter)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing; default: main)")
    p.add_argument("--commit-message", help="default: Upload METHOD adapter for MODEL")
    p.add_argument("--format", choices=["peftvision", "peft", "timm"], default="peftvision",
                   help="peftvision: the adapter directory (default); peft: HF PEFT's format; timm: merged into "
                        "a timm model (methods that merge)")
    p.add_argument("--checkpoint", help="peft, timm: local weights file for the base (default: download it)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="peft, timm: accept other base weights")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .adapters.card import quoting

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        with quoting(sys.argv[1:] if argv is None else argv):  # a run's model card gives its command line
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
