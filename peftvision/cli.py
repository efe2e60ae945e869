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
    """Write an adapter in another library's format (HF PEFT)."""
    from .adapters.io import load_adapter
    from .adapters.peft import export_peft

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint)
    path = export_peft(model, args.output)
    print(f"wrote {path}: load it with peft.PeftModel.from_pretrained(timm_model, '{path}')")


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
    from .training.evaluate import evaluate_model
    from .ui import progress_bar

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint).eval()
    task = load_task(args.dataset, seed=args.seed)
    if task.num_classes != model.num_classes:
        raise DataError(f"{args.dataset} has {task.num_classes} classes, the adapter's head {model.num_classes}")
    transform = make_transform(model, train=False, resize=get_state(model).resize)
    loader = build_loader(task.dataset(args.split, transform), batch_size=args.batch_size, num_workers=args.num_workers)
    with progress_bar(f"evaluating on {args.split} ({len(loader.dataset):,} images)", len(loader)) as tick:
        metrics = evaluate_model(model, loader, task.num_classes, on_batch=tick)
    # indented: still one JSON document for scripts, and it fits a terminal
    print(json.dumps({"adapter": str(args.adapter), "dataset": args.dataset, "split": args.split, **metrics}, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    """Top-k classes, with names, for image files."""
    import torch

    from .adapters.io import load_adapter
    from .data import make_transform, open_image
    from .methods.freeze import get_state

    model = load_adapter(args.adapter, checkpoint=args.checkpoint, ignore_fingerprint=args.ignore_fingerprint).eval()
    names = get_state(model).class_names
    transform = make_transform(model, train=False, resize=get_state(model).resize)
    for path in args.images:
        x = transform(open_image(path)).unsqueeze(0)
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        top = probs.topk(min(args.top_k, probs.numel()))
        label = lambda i: names[i] if names else str(i)  # noqa: E731
        print(f"{path}: " + ", ".join(f"{label(int(i))} {float(p):.3f}" for p, i in zip(top.values, top.indices)))


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

    cc = CompareConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), tasks=args.tasks,
        model=args.model or "", checkpoint=args.checkpoint, seeds=args.seeds, output=args.output,
        workers=args.workers, search=args.search, epochs=args.epochs, batch_size=args.batch_size,
        max_test=args.max_test, quiet=args.quiet, report_to=args.report_to, engine=args.engine,
        ray_address=args.ray_address, run_cpus=args.run_cpus, run_gpus=args.run_gpus, ray_files=args.ray_files,
    )
    compare(cc)
    print(f"results in {cc.output}: results.csv, results.json, summary.md, accuracy_vs_params.png, per_task.png")


def cmd_serve(args: argparse.Namespace) -> None:
    """Many adapters over one frozen backbone, batched together, over HTTP."""
    from .serving.http import find_adapters, serve

    serve(
        find_adapters(args.adapter, args.adapters_dir), checkpoint=args.checkpoint, host=args.host, port=args.port,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_image_mb=args.max_image_mb,
        ignore_fingerprint=args.ignore_fingerprint,
    )


def cmd_push(args: argparse.Namespace) -> None:
    """Upload an adapter directory, with its model card, to a Hugging Face Hub model repo."""
    from .adapters.hub import push

    url = push(args.adapter, args.repo, private=args.private, revision=args.revision, commit_message=args.commit_message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed to {url}")
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
    from .training.config import REPORT_TO, add_config_flags

    fields = add_config_flags(p)
    p.add_argument("--recipe", help="YAML file with the same keys as these flags (flags override it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config key, or a method option as METHOD.OPTION=VALUE (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (with --epochs: extend it)")
    p.set_defaults(func=cmd_finetune, config_fields=fields)

    from .compare.jobs import CompareConfig

    c = CompareConfig()
    p = sub.add_parser("compare", help="compare methods on a task suite (VTAB-1k protocol)", formatter_class=fmt)
    p.add_argument("--methods", default="", help="comma-separated method names (default: every registered method)")
    p.add_argument("--tasks", default=c.tasks, help="builtin:all, vtab:all, or SPEC,SPEC,...")
    p.add_argument("--model", help="timm model name (default: peftvision's embedded backbone)")
    p.add_argument("--checkpoint", help="local weights file for --model")
    p.add_argument("--seeds", type=int, default=c.seeds, help="seeds per (method, task)")
    p.add_argument("--output", default=c.output, help="comparison directory (rerun to resume)")
    p.add_argument("--workers", type=int, default=c.workers, help="runs in parallel (processes)")
    p.add_argument("--search", action="store_true", help="pick lr / weight decay per method on train800 -> val200")
    p.add_argument("--epochs", type=int, default=c.epochs, help="epochs per run")
    p.add_argument("--batch-size", type=int, default=c.batch_size)
    p.add_argument("--max-test", type=int, help="cap each task's test set")
    p.add_argument("--report-to", default=c.report_to, choices=REPORT_TO,
                   help="experiment tracker: one run per (method, task, seed), tagged with them")
    p.add_argument("--quiet", action="store_true")
    from .compare.jobs import ENGINES, RAY_FILES

    p.add_argument("--engine", choices=ENGINES, default=c.engine,
                   help="local: --workers processes on this machine; ray: one Ray task per run (pip install 'peftvision[ray]')")
    p.add_argument("--ray-address", help="a running Ray cluster: auto, or HOST:PORT (unset: start one on this machine)")
    p.add_argument("--run-cpus", type=float, help="CPUs per Ray run, also its torch threads (unset: 1; with GPUs, a GPU's share of its node)")
    p.add_argument("--run-gpus", type=float, help="GPUs per Ray run (unset: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--ray-files", choices=RAY_FILES, default=c.ray_files,
                   help="shared: workers write the run directories; return: they send them back; auto: each run checks")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="accuracy of an adapter on a dataset split", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--dataset", required=True, help="dataset spec, as for finetune")
    p.add_argument("--split", default="test", help="split to evaluate")
    p.add_argument("--seed", type=int, default=0, help="seed of the split drawing (as in training)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("export", help="write an adapter in HF PEFT format", formatter_class=fmt)
    _adapter_source(p)
    p.add_argument("--format", choices=["peft"], default="peft", help="target format")
    p.add_argument("--output", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve many adapters over one backbone over HTTP", formatter_class=fmt)
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="an adapter to serve as NAME, DIR a directory or hf:USER/NAME[@REVISION] (repeatable)")
    p.add_argument("--adapters-dir", metavar="DIR", help="serve every adapter folder directly inside DIR, named by its folder")
    p.add_argument("--checkpoint", help="local weights file for the shared base model (none: download it from the hub)")
    p.add_argument("--ignore-fingerprint", action="store_true", help="accept adapters trained on other base weights")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=32, help="most requests run as one batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file accepted (413 above)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("push", help="upload an adapter and its model card to the Hugging Face Hub")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (a finetune run, or save_adapter)")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing; default: main)")
    p.add_argument("--commit-message", help="default: Upload METHOD adapter for MODEL")
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
