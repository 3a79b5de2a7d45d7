"""Fine-tune a retrofitted model on an ImageFolder: one process, or many with torchrun.

    # one GPU (or the CPU): timm's ResNet-50 weights, SE inserted as identity, 10 epochs
    python examples/finetune.py --model resnet50 --pretrained --attn se --data PATH --out runs/se

    # 4 GPUs on one machine (DDP, NCCL); on CPUs torchrun runs gloo
    torchrun --nproc_per_node 4 examples/finetune.py --model resnet50 --pretrained --attn se --data PATH

    # train only the attention for 2 epochs, then everything; resume after a stop
    python examples/finetune.py ... --attn-only-epochs 2 --out runs/se
    python examples/finetune.py ... --out runs/se --resume runs/se/last.pt

PATH holds train/CLASS/*.jpg and val/CLASS/*.jpg. Preprocessing comes from the model's timm
data config. `--digits` trains on scikit-learn's bundled digits instead (no download).
The run folder gets last.pt (resumable), best.pt and metrics.jsonl; `retrofit gates
runs/se/best.pt --data PATH/val` then plots what the gates learned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import retrofit
from retrofit.data import imagefolder_datasets
from retrofit.distributed import init_distributed
from retrofit.errors import RetrofitError
from retrofit.finetune import FinetuneConfig, fit

# isort: split
from example_data import digits_datasets  # examples/example_data.py (examples/ is first on sys.path)


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)


def default_workers(most: int = 4) -> int:
    """DataLoader workers per process: ``most``, or the CPUs this process may use divided
    among the processes torchrun started on this machine, when there are fewer (more
    workers than CPUs only wait for each other, and PyTorch warns of it)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(most, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a retrofitted model (single process or torchrun).")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="resnet50", help="timm name, torchvision:NAME or file.py:factory")
    m.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    m.add_argument("--base-weights", metavar="FILE", help="state dict of the base model (your own trained weights)")
    m.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra timm arguments, e.g. \'{"drop_path_rate": 0.1}\'')
    m.add_argument("--attn", default="se", help="built-in rule set: se, eca, cbam, ... (default: se)")
    m.add_argument("--rules", metavar="FILE", help="rule file instead of --attn")
    m.add_argument("--gate", choices=("identity", "sigmoid"), help="gate form (default: the rules', identity)")
    m.add_argument("--input-size", type=_size, metavar="SIZE", help="size retrofit analyses the model at")
    m.add_argument("--graph-module", action="store_true",
                   help="fine-tune the torch.fx GraphModule form instead of the model's own class rewritten in "
                        "place (keep_class=True, the default here: blocks keep their class, hooks and FSDP wrap "
                        "policies work, timm's methods stay; same speed and memory)")
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="PATH", help="ImageFolder root with train/ and val/")
    src.add_argument("--digits", action="store_true", help="scikit-learn's digits (1x32x32, offline)")
    d.add_argument("--batch-size", type=int, default=64, help="per process")
    d.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers per process (default: 4, or fewer to fit this machine's CPUs: "
                        f"{default_workers()} here)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.01, help="peak lr of the model's own parameters")
    t.add_argument("--attn-lr", type=float, help="peak lr of the new attention parameters (default 10 x --lr)")
    t.add_argument("--attn-only-epochs", type=int, default=0, help="first epochs train only the attention")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--warmup-epochs", type=float, default=1.0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    t.add_argument("--device", help="cpu, cuda, ... (default: this rank's GPU if any)")
    t.add_argument("--resume", metavar="CKPT", help="continue from a last.pt of the same recipe")
    t.add_argument("--trust-code", action="store_true",
                   help="let --resume run the code its checkpoint names (a model file, an attention class); "
                        "only for checkpoints you trust")
    t.add_argument("--out", default="runs/finetune", help="run folder (default: runs/finetune)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        if args.resume:
            # The checkpoint's recipe builds the model; fit() then loads the weights,
            # optimizer and RNG states.
            model = retrofit.load(args.resume, trust_code=args.trust_code)
        else:
            kwargs = dict(args.model_kwargs)
            if args.digits:
                kwargs.setdefault("in_chans", 1)
                kwargs.setdefault("num_classes", 10)
            else:
                train_dir = Path(args.data) / "train"
                n_classes = sum(e.is_dir() for e in train_dir.iterdir()) if train_dir.is_dir() else 0
                kwargs.setdefault("num_classes", n_classes or None)  # imagefolder_datasets reports a bad PATH
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            input_size = args.input_size or ((kwargs.get("in_chans", 1), 32, 32) if args.digits else None)
            base = retrofit.create_model(args.model, pretrained=args.pretrained, **kwargs)
            if args.base_weights:
                base.load_state_dict(torch.load(args.base_weights, map_location="cpu", weights_only=True))
            torch.manual_seed(args.seed)
            model = retrofit.retrofit(base, None if args.rules else args.attn, rules=args.rules, gate=args.gate,
                                      input_size=input_size, keep_class=not args.graph_module)
            if ctx.is_main:
                print(retrofit.get_report(model).summary(), flush=True)
        if args.digits:
            c, h, _ = retrofit.get_report(model).input_size
            data = digits_datasets(h, c)
        else:
            data = imagefolder_datasets(args.data, model)
        config = FinetuneConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, attn_lr=args.attn_lr,
            attn_only_epochs=args.attn_only_epochs, optimizer=args.optimizer, weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
            amp=False if args.no_amp else None, channels_last=args.channels_last, compile=args.compile,
            num_workers=args.workers, seed=args.seed, device=args.device, progress=not args.no_progress,
            out=args.out,
        )
        result = fit(model, data.train, data.val, config, resume=args.resume, ctx=ctx)
    except RetrofitError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        ctx.close()
        return 2
    if ctx.is_main:
        print(f"best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch}; "
              f"{result.steps} steps on {ctx.world_size} process(es); checkpoint {result.checkpoint}")
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
