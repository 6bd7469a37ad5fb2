"""Offline tiny Qwen2.5-VL pieces for tests (no hub access, no downloads).

- :func:`build_local_tokenizer`: a byte-level BPE trained in-process on the prompt templates,
  digits, JSON punctuation and structure names, wrapped as a ``Qwen2Tokenizer`` with the Qwen2-VL
  special tokens and chat template;
- :func:`tiny_qwen25_vl_config`: a ~0.24 M parameter ``Qwen2_5_VLConfig`` (2 text layers of width 64,
  2 vision blocks of width 32);
- :func:`build_tiny_processor`: a ``Qwen2_5_VLProcessor`` with small ``max_pixels`` (fast tests);
- :func:`save_tiny_checkpoint`: model + tokenizer + processor in a folder :class:`rau.methods.qwen.QwenLocalizer`
  loads.

Random weights answer garbage; these exist to exercise shapes, plumbing and parsing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Qwen2-VL special tokens, in the order of the real vocabulary (ids follow the BPE vocab here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL chat template (system prompt by default; each {"type": "image"} becomes one
# vision_start/image_pad/vision_end triple that the processor expands to the image's token count).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STRUCTURE_NAMES = (
    "left lung", "right lung", "heart", "aorta", "trachea", "spine", "left clavicle",
    "right clavicle", "liver", "spleen", "stomach", "left kidney", "right kidney", "bladder",
    "pancreas", "gallbladder", "esophagus", "diaphragm", "rib", "vertebra", "femur", "pelvis",
)

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TEST_MAX_PIXELS = 224 * 224
TEST_MIN_PIXELS = 56 * 56


def _corpus() -> list[str]:
    """Text the test tokenizer is trained on: templates, answers, digits, punctuation, names."""
    import numpy as np

    from rau import prompts

    rng = np.random.default_rng(0)
    texts = list(prompts.corpus()) + list(STRUCTURE_NAMES)
    texts += [" ".join(str(i) for i in range(1001)), "yes no Yes No . , : ; ( ) [ ] { } \" ' ```json ```"]
    texts += ["system user assistant You are a helpful assistant. Picture Video"]
    for name in STRUCTURE_NAMES:
        for task in prompts.TASKS:
            texts.append(prompts.build_question(task, name))
        box = sorted(rng.integers(0, 900, 2).tolist())
        texts.append(json.dumps({"label": name, "visible": "yes", "bbox_2d": [box[0], box[0], box[1] + 5, box[1] + 9]}))
        texts.append(json.dumps({"label": name, "visible": "no"}))
    return texts


def build_local_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 1024):
    """Train a byte-level BPE on :func:`_corpus` and wrap it as a Qwen2 tokenizer.

    Uses the same pre-tokenizer as ``Qwen2Tokenizer`` (so its merges apply unchanged) and byte-level
    coverage (no unknown tokens). eos = ``<|im_end|>``, pad = ``<|endoftext|>``, chat template =
    :data:`QWEN2_VL_CHAT_TEMPLATE`. Deterministic. Saved to ``save_dir`` when given.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    try:  # the regex Qwen2Tokenizer rebuilds its pre-tokenizer with: merges must be trained under it
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    except ImportError:
        PRETOKENIZE_REGEX = QWEN2_PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    # tokenizers >= 0.20 stores merges as pairs, older ones as "a b" strings.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """Model-config ids of the vision/eos/pad tokens in ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer: lacks the Qwen2-VL special tokens {missing}; build it with build_local_tokenizer")
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def tiny_qwen25_vl_config(
    vocab_size: int,
    *,
    token_ids: Mapping[str, int] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_intermediate_size: int = 64,
):
    """A very small ``Qwen2_5_VLConfig``.

    ``token_ids``: from :func:`special_token_ids` (the vision token ids must match the tokenizer);
    default: those of :func:`build_local_tokenizer`.
    Text head_dim = hidden_size / num_heads; M-RoPE splits head_dim / 2 frequencies into
    (temporal, height, width) sections that must sum to head_dim / 2, so they are derived here
    (the real 7B uses head_dim 128 -> [16, 24, 24]). Vision head_dim must be a multiple of 4 (2D
    axial RoPE over half the head). The vision tower uses the real patch 14 / merge 2 geometry, so
    image token counts and box coordinates behave as in the full model.
    """
    from transformers import Qwen2_5_VLConfig

    if token_ids is None:
        token_ids = special_token_ids(build_local_tokenizer())
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 2:
        raise ValueError(f"hidden_size/num_heads: {hidden_size}/{num_heads} must give an even integer head_dim")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_kv_heads} must divide num_heads={num_heads}")
    vision_head_dim = vision_hidden_size // vision_heads
    if vision_hidden_size % vision_heads or vision_head_dim % 4:
        raise ValueError(
            f"vision_hidden_size/vision_heads: {vision_hidden_size}/{vision_heads} must give a head_dim divisible by 4"
        )
    half = head_dim // 2
    # Same proportions as [16, 24, 24]/64: a quarter temporal, the rest split between H and W.
    t = max(1, half // 4)
    h = (half - t) // 2
    mrope_section = [t, h, half - t - h]
    text_config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
    }
    vision_config: dict[str, Any] = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )


def build_tiny_processor(tokenizer, max_pixels: int = TEST_MAX_PIXELS, min_pixels: int = TEST_MIN_PIXELS):
    """``Qwen2_5_VLProcessor`` around ``tokenizer`` with a small pixel budget (224 x 224 by default).

    The processor insists on a video processor even for image-only use, so a small one is built too.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_tiny_model(tokenizer, seed: int = 0, **config_kwargs):
    """Random-weight ``Qwen2_5_VLForConditionalGeneration`` matching ``tokenizer`` (float32, eval mode)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    vocab_size = -(-len(tokenizer) // 64) * 64  # padded like real checkpoints (151936 > len(tokenizer))
    ids = special_token_ids(tokenizer)
    config = tiny_qwen25_vl_config(vocab_size, token_ids=ids, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["pad_token_id"]]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.bos_token_id = ids["bos_token_id"]
    return model


def save_tiny_checkpoint(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a random tiny Qwen2.5-VL (model, tokenizer, processor) to ``path``; returns it.

    The folder has the layout of a hub checkpoint (config.json, model.safetensors,
    generation_config.json, tokenizer + processor files), so
    ``QwenLocalizer(path)`` loads it offline.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_local_tokenizer()
    processor = build_tiny_processor(tokenizer)
    model = build_tiny_model(tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path
