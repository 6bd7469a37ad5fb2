"""The ``rau`` command line: one typer tool, a thin shell over the Python API.

    rau localize --reference ref.png --reference-masks ref_masks/ --target tgt.png --out out/
    rau eval --targets DATASET --references DATASET --out result.json
    rau train refvlm --cache runs/ref/ws.npz --output-dir runs/ref/vlm
    rau methods

This module only builds the tool: the commands live in one module per group (:mod:`rau.cli.infer`,
:mod:`rau.cli.evaluate`, :mod:`rau.cli.data`, :mod:`rau.cli.train`, :mod:`rau.cli.train_masks`),
which share :mod:`rau.cli.common` and never import each other. Heavy imports happen inside each
command, so ``rau --help`` stays fast. Bad input: ``error: <one line>`` on stderr, exit code 2.
"""

from __future__ import annotations

import typer

from rau.cli import data, evaluate, infer, serve, train, train_checks, train_masks, train_memseg, train_refine
from rau.cli.common import one_line_warnings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rau: identify, localize and segment named structures in medical images from one annotated reference.",
    pretty_exceptions_enable=False,
)

train_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train rau's models (every run resumable: rerun the command after a kill).",
    pretty_exceptions_enable=False,
)

INFER, EVAL, DATA = "Inference", "Evaluation", "Data and training"

for name, fn, panel in (
    ("localize", infer.localize, INFER),
    ("index", infer.index, INFER),
    ("methods", infer.methods, INFER),
    ("serve", serve.serve, INFER),
    ("eval", evaluate.eval_, EVAL),
    ("report", evaluate.report, EVAL),
    ("bench", evaluate.bench, EVAL),
    ("calibrate", evaluate.calibrate, EVAL),
    ("eval-tokens", evaluate.eval_tokens, EVAL),
    ("eval-chex-tokens", evaluate.eval_chex_tokens, EVAL),
    ("eval-unet", evaluate.eval_unet, EVAL),
    ("eval-masktok", evaluate.eval_masktok, EVAL),
    ("drr", data.drr, DATA),
):
    app.command(name, rich_help_panel=panel)(fn)

for name, fn in (
    ("refvlm", train.refvlm),
    ("grpo", train.grpo),
    ("seg-cache", train.seg_cache),
    ("seg-head", train.seg_head),
    ("chex-cache", train.chex_cache),
    ("chex", train.chex),
    ("vlm", train.vlm),
    ("masktok", train_masks.masktok),
    ("unet", train_masks.unet),
    ("memseg-cache", train_memseg.memseg_cache),
    ("memseg", train_memseg.memseg),
    ("seg-head-memseg", train_memseg.seg_head_memseg),
    ("refine-cache", train_refine.refine_cache),
    ("refine", train_refine.refine),
    ("laterality", train_checks.laterality),
    ("image-kind", train_checks.image_kind),
    ("visibility", train_checks.visibility),
):
    train_app.command(name)(fn)

app.add_typer(train_app, name="train", rich_help_panel=DATA,
              help="Train a model: refvlm, grpo, seg-cache, seg-head, chex-cache, chex, vlm, masktok, unet, memseg-cache, memseg, seg-head-memseg, refine-cache, refine, laterality, image-kind, visibility.")


def main() -> None:
    one_line_warnings()
    app()


if __name__ == "__main__":
    main()
