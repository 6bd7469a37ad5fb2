"""The processor side of one Qwen-VL chat turn: PIL images, processor inputs (with training
labels on the answer tokens only) and right-padded batches. torch / PIL are imported inside."""

from __future__ import annotations

from typing import Any

import numpy as np


def set_max_pixels(image_processor, max_pixels: int) -> None:
    """Cap the resized pixels per image at ``max_pixels`` (>= 28 * 28)."""
    # Set on the image processor itself: from_pretrained(max_pixels=...) works but 5.23 then warns
    # on every call (call-time min/max_pixels are deprecated), and `size` is what smart_resize reads.
    shortest = int(image_processor.size["shortest_edge"] or 0)
    image_processor.size = {"shortest_edge": min(shortest, max_pixels), "longest_edge": max_pixels}


def to_pil(rgb: np.ndarray):
    """(H, W, 3) uint8 array -> PIL RGB image."""
    # PIL, not arrays: a (H, W, 3) array with H or W == 3 makes the channel axis ambiguous.
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("RGB")


def encode_example(processor, messages: list[dict], images: list, answer_text: str | None = None) -> dict:
    """Processor inputs for one chat turn (batch of 1); with ``answer_text`` also training ``labels``.

    The prompt (with generation prompt) goes through the processor; the answer + ``<|im_end|>``
    are tokenized separately and appended, so the label mask is exact by construction.
    Returns a dict of tensors: input_ids / attention_mask / mm_token_type_ids (1, L), pixel_values
    (N_patches, C*T*P*P), image_grid_thw (n_images, 3) and labels (1, L), -100 on the prompt.
    """
    import torch

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[prompt], images=images, return_tensors="pt"))
    if answer_text is None:
        return inputs
    tokenizer = processor.tokenizer
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    answer = torch.tensor([answer_ids], dtype=inputs["input_ids"].dtype)
    n_prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):  # 0 = text for every answer token
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(answer, dtype=inputs[key].dtype)], dim=1)
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    inputs["labels"] = labels
    return inputs


def collate(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad single-example encodings (:func:`encode_example`) into a batch.

    Token tensors (1, L_i) -> (B, max L): input_ids padded with ``pad_id``, attention_mask and
    mm/token_type_ids with 0, labels with -100. pixel_values (N_i, D) and image_grid_thw (n_i, 3)
    are concatenated in example order (the model splits them by grid).
    """
    import torch

    if len(examples) == 1:
        return dict(examples[0])
    length = max(e["input_ids"].shape[1] for e in examples)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}
    batch: dict[str, Any] = {}
    for key, value in pads.items():
        if key in examples[0]:
            rows = [torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]), value=value) for e in examples]
            batch[key] = torch.cat(rows, dim=0)
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([e[key] for e in examples], dim=0)
    return batch
