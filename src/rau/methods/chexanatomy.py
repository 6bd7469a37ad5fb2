"""The CheXanatomy VLM behind rau's :class:`~rau.methods.interfaces.Localizer` interface (method ``chexanatomy``).

CheXanatomy needs no reference image: the reference only says WHICH structures to report (its
mask names). Each structure is asked as "segment X": the answer's 4 location tokens give the box,
its 16 codes the mask (decoded by the shipped mask tokenizer). The target is encoded once and all
structures are answered in one batch. Structures the model was not trained on come back as not
found, with the reason.
"""

from __future__ import annotations

from pathlib import Path

from rau.assets import ASSETS_DIR
from rau.data.annotated import AnnotatedImage
from rau.methods.interfaces import Localization, Localizer

#: The shipped model (scripts/chexanatomy_ship.sh reproduces it).
DEFAULT_CHEX_DIR = ASSETS_DIR / "chex"


class ChexLocalizer(Localizer):
    name = "chexanatomy"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu"):
        from rau.tokens.masktok import load_default
        from rau.models.chex.modeling import ChexModel

        self.model = ChexModel.from_pretrained(model_dir, device=device)
        self.tokenizer = load_default()

    def localize(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str]) -> dict[str, Localization]:
        known = [s for s in structures if self.model.vocab.knows(s)]
        out = {s: Localization(reason=f"structure {s!r} is not one the CheXanatomy model was trained on")
               for s in structures if s not in known}
        if not known:
            return out
        features = self.model.encode([target.image])
        for name, ans in self.model.segment(features, known).items():
            decoded = self.tokenizer.decode(ans.loc, ans.codes, target.shape)
            if decoded.mask is None:
                out[name] = Localization("no", decoded.box_xyxy_px, 0.0, f"model answer does not decode: {decoded.reason}")
            else:
                out[name] = Localization("yes", decoded.box_xyxy_px, ans.score, None, decoded.mask)
        return out
