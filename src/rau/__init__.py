"""rau: reference-based anatomical understanding in medical images.

Give it one annotated reference image (pixels + named masks) and unlabeled targets of the same
anatomy; it identifies, localizes (box) and segments (mask) each named structure in the targets.

Heavy dependencies (torch, transformers, SimpleITK) are imported only by the backends that need
them, so ``import rau`` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import CheckpointError, RauInputError

__all__ = [
    "AnnotatedImage",
    "CheckpointError",
    "RauInputError",
    "StructureResult",
    "TargetResult",
    "__version__",
    "create_method",
    "load_annotated",
    "load_dataset",
    "localize",
    "localize_from_bank",
    "localize_many",
    "propagate",
    "build_bank",
    "ReferenceBank",
]


def __getattr__(name: str):
    # Lazy re-exports keep `import rau` free of torch/SimpleITK.
    if name == "load_annotated":
        from rau.data.io import load_annotated

        return load_annotated
    if name == "load_dataset":
        from rau.data.dataset import load_dataset

        return load_dataset
    if name == "create_method":
        from rau.methods import create_method

        return create_method
    if name == "localize":
        from rau.pipeline import localize

        return localize
    if name == "localize_from_bank":
        from rau.pipeline import localize_from_bank

        return localize_from_bank
    if name == "localize_many":
        from rau.batch import localize_many

        return localize_many
    if name == "propagate":
        from rau.volume import propagate

        return propagate
    if name in ("build_bank", "ReferenceBank"):
        import rau.references.bank

        return getattr(rau.references.bank, name)
    raise AttributeError(f"module 'rau' has no attribute {name!r}")
