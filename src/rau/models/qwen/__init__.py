"""Qwen2.5-VL (also Qwen2-VL / Qwen3-VL) from a local hub-layout folder: checking and loading
(:mod:`.loading`), LoRA adapters (:mod:`.lora`) and the processor side of one chat turn
(:mod:`.processor`: PIL images, ``encode_example`` with training labels, ``collate``).

The inference adapter is :class:`rau.methods.qwen.QwenLocalizer`; supervised fine-tuning is
:mod:`rau.training.recipes.qwen_sft`. Nothing heavy is imported here: torch / transformers / peft
are imported inside the functions that need them.
"""

from rau.models.qwen.loading import COORDS_BY_MODEL_TYPE, check_checkpoint, load_qwen, resolve_dtype
from rau.models.qwen.lora import add_lora, merge_lora, trainable_parameters
from rau.models.qwen.processor import collate, encode_example, set_max_pixels, to_pil

__all__ = [
    "COORDS_BY_MODEL_TYPE", "add_lora", "check_checkpoint", "collate", "encode_example", "load_qwen",
    "merge_lora", "resolve_dtype", "set_max_pixels", "to_pil", "trainable_parameters",
]
