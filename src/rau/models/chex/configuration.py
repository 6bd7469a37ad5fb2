"""CheXanatomy VLM configuration (:class:`ChexConfig`, saved as config.json) and vocabulary
(:class:`ChexVocab`): task tokens, one token per word of the structure names, 1024 location tokens
and the mask tokenizer's 512 codebook tokens (:mod:`rau.tokens.masktok`).

Tasks, each one fixed-length block after the image tokens (names padded to ``q_words`` words)::

    detect X    <detect> w1 w2 w3 w4 <ans> | loc loc loc loc                  (4 answer tokens)
    segment X   <segment> w1 w2 w3 w4 <ans> | loc loc loc loc seg x 16        (20 answer tokens)
    name box    <name> loc loc loc loc <ans> | w1 w2 w3 w4                    (4 answer tokens)

Location tokens are (ymin, xmin, ymax, xmax) on 1024 bins of the image and the 16 codes describe
the mask cropped to that box, exactly as :class:`rau.tokens.masktok.MaskTokenizer` encodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.decoder import DecoderConfig, config_from_dict

FORMAT = "rau-chexanatomy-v1"
SPECIALS = ("<pad>", "<img>", "<detect>", "<segment>", "<name>", "<ans>")
TASKS = ("detect", "segment", "name")


@dataclass
class ChexConfig(DecoderConfig):
    """Everything that defines a CheXanatomy model (saved as config.json). Vision fields: see
    :func:`rau.models.decoder.check_vision` (``preprocessing`` "equalize" or "minmax")."""

    names: list[str] = field(default_factory=list)
    q_words: int = 4
    format: str = FORMAT

    def __post_init__(self) -> None:
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            raise RauInputError("names: a CheXanatomy model needs the list of structure names it is trained on")
        for n in self.names:
            if len(n.split("_")) > self.q_words:
                raise RauInputError(f"names: {n!r} has more than q_words={self.q_words} words")
        super().__post_init__()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChexConfig:
        return config_from_dict(cls, values, FORMAT, "CheXanatomy model")


class ChexVocab:
    """Token ids: specials, one per name word (``<w:left>``), ``<loc0000>``..., ``<seg000>``..."""

    def __init__(self, config: ChexConfig):
        self.config = config
        self.words = sorted({w for n in config.names for w in n.split("_")})
        self.tokens = [*SPECIALS, *(f"<w:{w}>" for w in self.words)]
        self.loc_offset = len(self.tokens)
        self.tokens += [f"<loc{i:04d}>" for i in range(config.bins)]
        self.seg_offset = len(self.tokens)
        self.tokens += [f"<seg{i:03d}>" for i in range(config.codebook_size)]
        self.id = {t: i for i, t in enumerate(self.tokens)}
        self.word_ids = np.array([self.id[f"<w:{w}>"] for w in self.words] + [self.id["<pad>"]])

    def __len__(self) -> int:
        return len(self.tokens)

    def knows(self, name: str) -> bool:
        parts = name.split("_")
        return len(parts) <= self.config.q_words and all(f"<w:{w}>" in self.id for w in parts)

    def name_ids(self, name: str) -> list[int]:
        """Structure name -> ``q_words`` ids (words, then <pad>). RauInputError if unknown."""
        if not self.knows(name):
            raise RauInputError(f"structure {name!r} is not one this CheXanatomy model knows (it knows: {', '.join(self.config.names)})")
        ids = [self.id[f"<w:{w}>"] for w in name.split("_")]
        return ids + [self.id["<pad>"]] * (self.config.q_words - len(ids))

    def ids_to_name(self, ids: Sequence[int]) -> str:
        words = [self.tokens[i][3:-1] for i in ids if self.tokens[i].startswith("<w:")]
        return "_".join(words)

    def block(self, task: str, *, name: str | None = None, loc: Sequence[int] | None = None,
              codes: Sequence[int] | None = None) -> tuple[list[int], int]:
        """One task block -> (ids, number of answer tokens at its end). With the answer omitted
        (loc/codes None for detect/segment, name None for "name"), only the prompt is returned."""
        ans = self.id["<ans>"]
        if task in ("detect", "segment"):
            prompt = [self.id[f"<{task}>"], *self.name_ids(name), ans]
            answer = [] if loc is None else [self.loc_offset + int(v) for v in loc]
            if task == "segment" and codes is not None:
                answer += [self.seg_offset + int(c) for c in codes]
        elif task == "name":
            prompt = [self.id["<name>"], *(self.loc_offset + int(v) for v in loc), ans]
            answer = [] if name is None else self.name_ids(name)
        else:
            raise RauInputError(f"task: expected one of {TASKS}, got {task!r}")
        return prompt + answer, len(answer)

    def answer_length(self, task: str) -> int:
        return {"detect": 4, "segment": 4 + self.config.n_codes, "name": self.config.q_words}[task]

    def allowed(self, task: str, position: int) -> np.ndarray:
        """Token ids allowed at answer ``position`` of ``task`` (the constrained grammar)."""
        if task == "name":
            return self.word_ids
        if position < 4:
            return np.arange(self.loc_offset, self.loc_offset + self.config.bins)
        return np.arange(self.seg_offset, self.seg_offset + self.config.codebook_size)
