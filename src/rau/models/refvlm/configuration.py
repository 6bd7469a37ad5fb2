"""Compact RAU VLM configuration (:class:`RefVlmConfig`, saved as config.json) and vocabulary
(:class:`RefVocab`): a few specials, 1024 location tokens, the mask tokenizer's 512 codes.

One block per structure after the shared image prefix; the reference annotation enters as its box
(4 location tokens) and mask (16 codes of :mod:`rau.tokens.masktok`)::

    <q> rloc x4 rseg x16 <ans> | <yes> tloc x4 tseg x16        (structure visible in the target)
    <q> rloc x4 rseg x16 <ans> | <no>                            (not visible; the rest is padding)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.decoder import DecoderConfig, config_from_dict

FORMAT = "rau-refvlm-v1"
SPECIALS = ("<pad>", "<q>", "<ans>", "<yes>", "<no>")


@dataclass
class RefVlmConfig(DecoderConfig):
    """Everything that defines a compact RAU VLM (saved as config.json). Vision fields: see
    :func:`rau.models.decoder.check_vision` (``preprocessing`` "equalize" or "minmax")."""

    format: str = FORMAT

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RefVlmConfig:
        return config_from_dict(cls, values, FORMAT, "RAU VLM")


class RefVocab:
    """Token ids: specials, ``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg511>``."""

    def __init__(self, config: RefVlmConfig):
        self.config = config
        self.tokens = list(SPECIALS)
        self.loc_offset = len(self.tokens)
        self.tokens += [f"<loc{i:04d}>" for i in range(config.bins)]
        self.seg_offset = len(self.tokens)
        self.tokens += [f"<seg{i:03d}>" for i in range(config.codebook_size)]
        self.id = {t: i for i, t in enumerate(self.tokens)}
        self.prompt_length = 2 + 4 + config.n_codes
        self.answer_length = 1 + 4 + config.n_codes

    def __len__(self) -> int:
        return len(self.tokens)

    def prompt(self, ref_loc: Sequence[int], ref_codes: Sequence[int]) -> list[int]:
        if len(ref_loc) != 4 or len(ref_codes) != self.config.n_codes:
            raise RauInputError(f"reference tokens: expected 4 locations and {self.config.n_codes} codes")
        return [self.id["<q>"], *(self.loc_offset + int(v) for v in ref_loc),
                *(self.seg_offset + int(c) for c in ref_codes), self.id["<ans>"]]

    def answer(self, loc: Sequence[int] | None, codes: Sequence[int] | None) -> list[int]:
        """The answer tokens; ``loc`` None = not visible (``<no>`` then padding)."""
        if loc is None:
            return [self.id["<no>"]] + [self.id["<pad>"]] * (self.answer_length - 1)
        return [self.id["<yes>"], *(self.loc_offset + int(v) for v in loc), *(self.seg_offset + int(c) for c in codes)]

    def allowed(self, position: int) -> np.ndarray:
        """Token ids allowed at answer ``position`` (the constrained grammar)."""
        if position == 0:
            return np.array([self.id["<yes>"], self.id["<no>"]])
        if position < 5:
            return np.arange(self.loc_offset, self.loc_offset + self.config.bins)
        return np.arange(self.seg_offset, self.seg_offset + self.config.codebook_size)
