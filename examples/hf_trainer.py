"""Fine-tune a Hugging Face transformers CNN with retrofit's attention under transformers'
own ``Trainer``: retrofit, train (the attention at its own learning rate), save with
``save_model``, load back with ``retrofit.load``, and optionally share on the Hub.

    # a pretrained ConvNeXt from the Hub, SE inserted as identity, 3 epochs on an ImageFolder
    python examples/hf_trainer.py --model facebook/convnext-tiny-224 --data PATH --out runs/hf-se

    # offline: a model class with a small random config (what the tests run)
    python examples/hf_trainer.py --model-class ConvNextForImageClassification --tiny --data PATH --out runs/hf

PATH holds train/CLASS/*.jpg and val/CLASS/*.jpg. Needs the transformers extra
(``pip install "torch-retrofit[transformers,train]"``: transformers and accelerate, which
``Trainer`` runs on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

import retrofit
from retrofit.data import imagefolder_datasets

# isort: split
from finetune import default_workers  # examples/finetune.py (examples/ is first on sys.path)

# A ConvNeXt small enough to train on a CPU in seconds (--tiny).
TINY = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a retrofitted transformers model with Trainer.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hub id or a local folder for from_pretrained (facebook/convnext-tiny-224)")
    src.add_argument("--model-class", help="a transformers class with its default config, random weights "
                                           "(ConvNextForImageClassification)")
    p.add_argument("--tiny", action="store_true", help="with --model-class: a small config (CPU-sized)")
    p.add_argument("--data", required=True, metavar="PATH", help="ImageFolder root with train/ and val/")
    p.add_argument("--attn", default="se", help="built-in rule set (default: se)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the model's own parameters")
    p.add_argument("--attn-lr-mult", type=float, default=10.0, help="the attention's learning rate, times --lr")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers")
    p.add_argument("--out", default="runs/hf-trainer", help="output folder (default: runs/hf-trainer)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="also upload a retrofit save to this Hub repository")
    return p


def collate(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """ImageFolder's (image, label) pairs as the keyword arguments a transformers model takes."""
    pixels, labels = default_collate(batch)
    return {"pixel_values": pixels, "labels": labels}


def accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

    args = build_parser().parse_args(argv)
    classes = sorted(e.name for e in (Path(args.data) / "train").iterdir() if e.is_dir())
    if args.model:
        base = AutoModelForImageClassification.from_pretrained(
            args.model, num_labels=len(classes), ignore_mismatched_sizes=True)  # a new head for these classes
    else:
        base = retrofit.create_model(f"transformers:{args.model_class}", num_labels=len(classes),
                                     **(TINY if args.tiny else {}))
    model = retrofit.retrofit(base, args.attn)  # the model's own class, its blocks rewritten in place
    print(retrofit.get_report(model).summary(), flush=True)

    data = imagefolder_datasets(args.data, model)
    training = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to="none",
        remove_unused_columns=False, dataloader_num_workers=args.workers,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # The attention gets its own learning rate: Trainer takes the optimizer whole, and makes
    # its schedule (linear decay) over every group.
    optimizer = torch.optim.AdamW(retrofit.param_groups(model, args.lr, attention_lr_mult=args.attn_lr_mult,
                                                        weight_decay=args.weight_decay))
    trainer = Trainer(model=model, args=training, train_dataset=data.train, eval_dataset=data.val,
                      data_collator=collate, compute_metrics=accuracy, optimizers=(optimizer, None))
    trainer.train()
    metrics = trainer.evaluate()

    # save_model writes save_pretrained's folder; its config.json carries the recipe, so
    # retrofit.load builds the model with its attention (from_pretrained alone would drop it).
    trainer.save_model(args.out)
    loaded = retrofit.load(args.out).eval()
    x = next(iter(torch.utils.data.DataLoader(data.val, batch_size=4, collate_fn=collate)))["pixel_values"]
    with torch.no_grad():
        same = torch.equal(loaded(x).logits, model.eval().to("cpu")(x).logits)
    print(f"val accuracy {metrics['eval_accuracy']:.4f}; saved {args.out}; reloaded with retrofit.load: "
          f"{'same outputs' if same else 'OUTPUTS DIFFER'}")
    if args.push_to_hub:
        retrofit.push_to_hub(model, args.push_to_hub)  # a retrofit save: retrofit.load("hf-hub:ORG/NAME")
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
