"""Qwen-VL localizer: reference (annotation drawn on it) + target in one chat turn -> box per structure.

For each structure: draw ONLY that structure's annotation on the reference, ask
:func:`rau.prompts.build_messages` ("localize"), generate greedily, parse the JSON box with
:func:`rau.parsing.parse_box_answer` and map it back to ORIGINAL target pixels using the size the
processor actually resized the target to (``image_grid_thw`` x ``patch_size``).

Coordinates by ``config.model_type``: ``qwen2_5_vl`` answers in absolute pixels of the resized
image; ``qwen2_vl`` and ``qwen3_vl`` in 0..1000 (``norm1000``).

Checking, loading, LoRA merging and the processor inputs live in :mod:`rau.models.qwen`; this
module is the :class:`Localizer` adapter only. torch / transformers / peft are imported inside
functions: ``import rau.methods.qwen`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import mask_to_box
from rau.methods.interfaces import Localization, Localizer
from rau.models.qwen.loading import COORDS_BY_MODEL_TYPE, check_checkpoint, load_qwen, resolve_dtype
from rau.models.qwen.lora import merge_lora
from rau.models.qwen.processor import encode_example, to_pil
from rau.parsing import parse_box_answer
from rau.prompts import build_messages, target_text
from rau.render import draw_annotation, to_rgb

# Tokens that only the processor may place: a generated image/video placeholder would make the next
# step look for pixels that are not there.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


class QwenLocalizer(Localizer):
    """Qwen2.5-VL (also Qwen2-VL / Qwen3-VL) reference-based localizer.

    Args:
        checkpoint: local folder (hub layout); nothing is downloaded.
        device: torch device string ("cpu", "cuda", "cuda:0").
        dtype: torch dtype or name; default float32 on CPU, bfloat16 elsewhere.
        max_new_tokens: generation budget per structure (a box answer is ~30 tokens).
        lora: optional PEFT LoRA adapter folder, merged into the weights at load.
        max_pixels: optional cap on resized image pixels (both images), e.g. ``512 * 28 * 28``.

    Attributes: ``model``, ``processor``, ``coords`` ("qwen25_abs" or "norm1000"), ``raw_answers``
    (structure -> generated text of the last :meth:`localize` call, for debugging).
    """

    name = "qwen"

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str = "cpu",
        dtype: Any = None,
        max_new_tokens: int = 64,
        lora: str | Path | None = None,
        max_pixels: int | None = None,
    ):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 28 * 28):
            raise ValueError(f"max_pixels: expected an int >= 784 (one 28x28 patch group), got {max_pixels!r}")
        torch_dtype = resolve_dtype(dtype, device)  # bad dtype: ValueError before any loading
        path = check_checkpoint(checkpoint)
        self.processor, self.model, self.model_type = load_qwen(path, device, torch_dtype, max_pixels)
        if lora is not None:
            self.model = merge_lora(self.model, lora)
        self.coords = COORDS_BY_MODEL_TYPE[self.model_type]
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.checkpoint = path
        self.raw_answers: dict[str, str] = {}
        self._gen_config = None

    # ------------------------------------------------------------------ inputs
    def reference_rgb(self, reference: AnnotatedImage, structure: str) -> np.ndarray:
        """(H, W, 3) uint8: the reference with only ``structure`` outlined and named."""
        return draw_annotation(reference.image, {structure: reference.masks[structure]})

    def model_hw(self, image_grid_thw_row) -> tuple[int, int]:
        """(H, W) of the resized image the model saw, from one ``image_grid_thw`` row (t, h, w)."""
        patch = int(self.processor.image_processor.patch_size)
        return int(image_grid_thw_row[1]) * patch, int(image_grid_thw_row[2]) * patch

    def build_training_example(
        self,
        reference: AnnotatedImage,
        target: AnnotatedImage,
        structure: str,
        *,
        rng: np.random.Generator | None = None,
    ) -> tuple[list[dict], list, str]:
        """(messages, images, answer_text) for one localize question; answer from ``target.masks``.

        ``images`` = [reference with the structure drawn, target] as PIL RGB images; a structure
        absent or empty in ``target.masks`` gives the "not visible" answer. ``rng`` picks a
        paraphrase. Feed to :func:`encode_example` to get tensors with labels.
        """
        reference.require_nonempty([structure])
        images = [to_pil(self.reference_rgb(reference, structure)), to_pil(to_rgb(target.image))]
        mask = target.masks.get(structure)
        box = mask_to_box(mask) if mask is not None else None
        # The resized size from the image processor itself (not re-derived), as at inference.
        grid = self.processor.image_processor(images=[images[1]], return_tensors="pt")["image_grid_thw"][0]
        answer = target_text(
            "localize", structure, box_xyxy_px=box, target_hw=target.shape,
            model_hw=self.model_hw(grid), coords=self.coords,
        )
        return build_messages("localize", structure, coords=self.coords, rng=rng), images, answer

    # --------------------------------------------------------------- inference
    def _generation_config(self):
        from transformers import GenerationConfig

        if self._gen_config is not None and self._gen_config.max_new_tokens == self.max_new_tokens:
            return self._gen_config

        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tok.eos_token_id
        pad = self.model.generation_config.pad_token_id
        suppress = [
            i for i in tok.convert_tokens_to_ids(list(VISION_TOKENS)) if i is not None and i != tok.unk_token_id
        ]
        # A fresh config: checkpoints ship sampling settings (temperature, top_p, repetition penalty)
        # that would perturb greedy box digits.
        self._gen_config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else tok.pad_token_id,
            suppress_tokens=suppress or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        return self._gen_config

    def _generate(self, messages: list[dict], images: list) -> tuple[str, float, Any]:
        """(decoded new text without eos, mean probability of the generated tokens, image_grid_thw
        (n_images, 3) the processor produced)."""
        import torch

        inputs = encode_example(self.processor, messages, images)
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        gen_config = self._generation_config()
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=gen_config)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        logits = torch.stack([step[0] for step in out.logits]).float()  # (n_new, vocab), unprocessed
        probs = torch.softmax(logits, dim=-1).gather(1, new[: len(logits), None]).squeeze(1)
        eos = gen_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        keep = next((i for i, t in enumerate(new.tolist()) if t in eos_ids), len(new))
        text = self.processor.tokenizer.decode(new[:keep], skip_special_tokens=False)
        score = float(probs[: keep + 1].mean()) if len(probs) else 0.0  # include eos: it ends the answer
        return text, min(1.0, max(0.0, score)), inputs["image_grid_thw"].cpu()

    def localize(
        self,
        reference: AnnotatedImage,
        target: AnnotatedImage,
        structures: list[str],
    ) -> dict[str, Localization]:
        """One generation per structure; see the module doc. Raises RauInputError when a structure
        is not annotated (or empty) in ``reference``; never raises on model output."""
        reference.require_nonempty(list(structures))
        target_pil = to_pil(to_rgb(target.image))
        results: dict[str, Localization] = {}
        self.raw_answers = {}
        for structure in structures:
            messages = build_messages("localize", structure, coords=self.coords)
            images = [to_pil(self.reference_rgb(reference, structure)), target_pil]
            text, score, grid_thw = self._generate(messages, images)
            self.raw_answers[structure] = text
            # The target is the last image: its resized size is what bbox_2d pixels refer to.
            model_hw = self.model_hw(grid_thw[-1])
            parsed = parse_box_answer(text, target.shape, model_hw, self.coords, structure=structure)
            reason = parsed.reason
            if reason is not None:
                reason = f"{reason}; model answer: {text[:80]!r}"
            results[structure] = Localization(
                answer=parsed.visible, box_xyxy_px=parsed.box_xyxy_px, score=score, reason=reason
            )
        return results
