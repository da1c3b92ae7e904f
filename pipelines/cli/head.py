"""`catalog-index train-head`: train a projection head on frozen embeddings; adopt it only if it helps.

Turns flags into HeadSettings and calls pipelines.head.train_head; no training logic lives here.
Runs in one process (the head is tiny; the vectors stream through petastorm), so it never
starts Spark. Exit codes follow pipelines.cli: 0 finished (adopted or not: both are answers),
1 stopped because the input cannot train a head, 2 usage or configuration error.
"""
from __future__ import annotations

import argparse

from pipelines.cli.common import EPILOG, settings_from_args
from pipelines.config import HeadSettings
from pipelines.progress import console, make_progress


def add_head_commands(sub) -> None:
    defaults = HeadSettings()
    p = sub.add_parser(
        "train-head", help="train a projection head on frozen embeddings; adopted only if it improves precision@10",
        description="Train a small projection head (Linear + L2 norm) on the frozen embeddings of a dedup run's "
                    "canonical images, with category labels and a supervised contrastive loss, on a split held out "
                    "by product. It is saved under models/heads/<version>/ and named in models/heads/ADOPTED.json "
                    "only if its held-out category precision@10 (exact cosine kNN among held-out images) beats the "
                    "raw vectors' by a reliable margin; otherwise ADOPTED.json records 'not adopted' with the numbers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, metavar="ID", help="the committed dedup run whose images train the head")
    p.add_argument("--model-version", metavar="V",
                   help="base embeddings to train on, embeddings/<V>/ (default: the installed model's version)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N", help=f"default {defaults.epochs}")
    g.add_argument("--dim", type=int, default=defaults.dim, metavar="D",
                   help=f"head output dimension (default {defaults.dim})")
    g.add_argument("--holdout", type=float, default=defaults.holdout, metavar="F",
                   help=f"fraction of images held out, whole products at a time (default {defaults.holdout})")
    g.add_argument("--seed", type=int, default=defaults.seed, metavar="S",
                   help="seeds the split and the batch order; same seed, same head (default 0)")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                   help=f"default {defaults.batch_size}")
    g.add_argument("--learning-rate", type=float, default=defaults.learning_rate, metavar="LR",
                   help=f"AdamW learning rate (default {defaults.learning_rate})")
    g.add_argument("--temperature", type=float, default=defaults.temperature, metavar="T",
                   help=f"contrastive loss temperature (default {defaults.temperature})")
    g.add_argument("--min-gain", type=float, default=defaults.min_gain, metavar="G",
                   help="precision@10 gain needed to adopt, besides beating two standard errors "
                        f"(default {defaults.min_gain})")
    c = p.add_argument_group("common settings")
    c.add_argument("--config", metavar="FILE", help="YAML settings file (default: $CATALOG_INDEX_CONFIG)")
    c.add_argument("--warehouse", metavar="URI",
                   help="warehouse root: file:///path or s3://bucket/prefix (default: ~/.catalog-index/warehouse)")
    c.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto); default AWS")
    p.set_defaults(func=cmd_train_head, spark_master=None)


def cmd_train_head(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.dedup.stage import DedupError
    from pipelines.embed.head import HeadError, HeadSettings, train_head

    head_settings = HeadSettings(epochs=args.epochs, dim=args.dim, holdout=args.holdout, seed=args.seed,
                                 batch_size=args.batch_size, learning_rate=args.learning_rate,
                                 temperature=args.temperature, min_gain=args.min_gain)
    settings = settings_from_args(args)
    console.print(f"train-head on dedup run [bold]{args.run_id}[/] in {settings.warehouse}")
    try:
        with make_progress() as progress:
            task = progress.add_task("train-head", total=head_settings.epochs)

            def on_epoch(epoch: int, loss: float) -> None:
                progress.update(task, advance=1, description=f"train-head (loss {loss:.3f})")

            result = train_head(settings, args.run_id, head_settings, model_version=args.model_version,
                                progress=on_epoch)
    except (HeadError, DedupError, FileNotFoundError) as exc:
        console.print(f"[red]stopped:[/] {exc}")
        return 1
    console.print(f"base model {result.base_model_version}: {result.train_images:,} training images "
                  f"({result.train_products:,} products), {result.heldout_images:,} held out "
                  f"({result.heldout_products:,} products), {result.categories} categories, "
                  f"final loss {result.final_loss:.3f} after {result.epochs} epochs")
    console.print(f"held-out category precision@{result.k}: raw {result.raw_precision_at_k:.3f}, "
                  f"head {result.head_precision_at_k:.3f} (gain {result.gain:+.3f} ± {result.gain_stderr:.3f}; "
                  f"random neighbours {result.chance_precision_at_k:.3f})")
    if result.adopted:
        console.print(f"[green]adopted[/] {result.head_version} -> models/heads/ADOPTED.json")
    else:
        console.print("[yellow]not adopted[/]: raw vectors stay in use (recorded in models/heads/ADOPTED.json)")
    return 0
