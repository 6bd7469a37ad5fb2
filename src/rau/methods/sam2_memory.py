"""SAM2 video-memory segmenter: the annotated reference is frame 0, the target is frame 1.

Route, per :meth:`Sam2MemorySegmenter.segment` call (transformers ``Sam2VideoModel`` +
``Sam2VideoProcessor``):

1. one 2-frame inference session: frame 0 = reference, frame 1 = target; one SAM2 object id per
   structure;
2. every structure's reference MASK is added on frame 0 in ONE
   ``processor.add_inputs_to_inference_session`` call (the processor keeps only the object ids of
   its latest call as "new inputs", so per-structure calls would drop all but the last), then
   ``model(session, frame_idx=0)`` turns the masks into conditioning memories;
3. ``model(session, frame_idx=1)`` with no prompt: every structure is segmented from memory alone
   (frame 1 becomes a *tracked* frame);
4. only for structures that have a box: the boxes are added on frame 1 (again one call) and
   ``model(session, frame_idx=1)`` runs again. The order matters: a box on a frame that has not been
   tracked yet makes it a new initial conditioning frame and the reference memory is ignored;
   after step 3 the boxed run is memory-conditioned AND box-prompted.

Shared across structures: the image encoder runs once per frame (twice per target: the session
caches the vision features of both frames), and (transformers >= 5.x) the memory encoder is batched
over all structures.
Per structure, only memory attention, the mask decoder and the memory encoder run. Structures
without a box keep their step-3 result (the transformers loop recomputes them in step 4, which is
deterministic and cheap, but their step-3 masks are the "memory alone" answer by definition).

Sizes: SAM2 resizes every frame to a ``image_size`` square (aspect ratio not kept, no padding). A
video needs one frame size, so the reference image is first resized (bilinear, antialiased) to the
TARGET size, then the processor resizes both frames to the square; the reference masks go straight
from reference size to the square (processor: antialiased bilinear, >= 0.5). Both map the full
image extent onto the full square, so frame and mask stay aligned. Output masks are brought back to
the target size.

No SAM2 weights are bundled: pass a local folder saved by ``Sam2VideoModel.save_pretrained`` (or a
local copy of a transformers SAM2.1 repository that loads as ``Sam2VideoModel``). The processor is
built offline from the model config (never from the hub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rau.data.annotated import AnnotatedImage
from rau.errors import CheckpointError, RauInputError
from rau.geometry import Box, clip_box
from rau.methods.interfaces import SegmentationOutput, Segmenter

REFERENCE_FRAME = 0
TARGET_FRAME = 1
TINY_IMAGE_SIZE = 128


def tiny_sam2_config():
    """A very small random-weight ``Sam2VideoConfig`` (128 px, ~1.3 M parameters) for tests.

    Constraints found in transformers' SAM2 video code: ``memory_encoder_output_channels`` must be 64
    (the memory cross-attention has ``kv_in_dim=64`` hard-coded) and the FPN width must be a multiple
    of it and LARGER (object pointers are split into ``fpn_hidden_size // 64`` tokens; equal widths
    crash). A Hiera block with global attention must not be the first (pooling) block of a stage.
    """
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig

    size, hidden, mem = TINY_IMAGE_SIZE, 128, 64
    backbone = Sam2HieraDetConfig(
        hidden_size=16, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )
    feature_sizes = [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2]
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                              backbone_feature_sizes=feature_sizes, fpn_hidden_size=hidden)
    return Sam2VideoConfig(
        vision_config=vision, image_size=size,
        prompt_encoder_config={"hidden_size": hidden, "image_size": size, "patch_size": 16,
                               "mask_input_channels": 8},
        mask_decoder_config={"hidden_size": hidden, "mlp_dim": 64, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 32},
        num_maskmem=2, memory_attention_hidden_size=hidden, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[size // 16] * 2,
        memory_encoder_hidden_size=hidden, memory_encoder_output_channels=mem, mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
    )


def _as_config(config: Any):
    """A ``Sam2VideoConfig`` from a config object or a plain dict."""
    from transformers import Sam2VideoConfig

    return Sam2VideoConfig(**config) if isinstance(config, dict) else config


def _load_model(checkpoint: str | Path | None, config: Any, device: str):
    """Sam2VideoModel in eval mode: local checkpoint folder, else random weights from ``config``."""
    from transformers import Sam2VideoModel

    if checkpoint is None:
        if config is None:
            raise CheckpointError(
                "checkpoint: no SAM2 weights are bundled with rau; pass a local SAM2 checkpoint folder "
                "(transformers Sam2Video format: config.json + model.safetensors)"
            )
        model = Sam2VideoModel(_as_config(config))
    else:
        path = Path(checkpoint)
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint: {path} is not a folder; pass a local transformers Sam2Video checkpoint folder "
                "(config.json + model.safetensors, e.g. written by Sam2VideoModel.save_pretrained)"
            )
        extra = {"config": _as_config(config)} if config is not None else {}
        try:
            model = Sam2VideoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # truncated/foreign folder: one line
            raise CheckpointError(
                f"checkpoint: cannot load a Sam2Video model from {path} ({exc.__class__.__name__}); "
                "the folder needs config.json (model_type sam2_video) and model.safetensors"
            ) from None
    return model.to(device=device, dtype=torch.float32).eval()


def _image_processor_class():
    """``Sam2ImageProcessor`` (transformers >= 5.2x) or ``Sam2ImageProcessorFast`` (older 5.x)."""
    import transformers

    for name in ("Sam2ImageProcessor", "Sam2ImageProcessorFast"):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ImportError("transformers has no SAM2 image processor; install transformers>=5.0")


def build_processor(image_size: int):
    """``Sam2VideoProcessor`` for an ``image_size`` square model input, built offline (no hub)."""
    from transformers import Sam2VideoProcessor, Sam2VideoVideoProcessor

    square = {"height": int(image_size), "width": int(image_size)}
    low_res = {"height": int(image_size) // 4, "width": int(image_size) // 4}
    image_processor = _image_processor_class()(size=square, mask_size=low_res)
    video_processor = Sam2VideoVideoProcessor(size=square)
    return Sam2VideoProcessor(image_processor=image_processor, video_processor=video_processor)


def two_frame_video(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(Hr, Wr) reference + (H, W) target in [0, 1] -> (2, H, W, 3) float32 video in [0, 255].

    The reference is resized to the target size (bilinear, antialiased); gray is replicated to RGB.
    The processor rescales by 1/255 and applies the ImageNet mean/std itself.
    """
    hw = target.shape
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None]
    if tuple(ref.shape[-2:]) != tuple(hw):
        ref = F.interpolate(ref, size=hw, mode="bilinear", align_corners=False, antialias=True)
    frames = np.stack([ref[0, 0].numpy(), np.asarray(target, dtype=np.float32)])
    frames = np.clip(frames, 0.0, 1.0) * 255.0
    return np.repeat(frames[..., None], 3, axis=-1)


class Sam2MemorySegmenter(Segmenter):
    """Segment each structure in the target from the reference mask held in SAM2's video memory.

    Args:
        checkpoint: local folder with a transformers Sam2Video checkpoint (config.json + safetensors).
        config: ``Sam2VideoConfig`` (or dict); with ``checkpoint=None`` it builds random weights (tests).
        device: torch device of the model and the inference session.
        threshold: logit threshold on the upsampled mask logits.
    """

    name = "sam2-memory"
    uses_reference = True
    needs_boxes = False

    def __init__(self, checkpoint: str | Path | None = None, *, config: Any = None, device: str = "cpu",
                 threshold: float = 0.0):
        self.model = _load_model(checkpoint, config, device)
        self.processor = build_processor(self.model.config.image_size)
        self.device = device
        self.threshold = float(threshold)

    @classmethod
    def tiny(cls, seed: int = 0, *, device: str = "cpu", threshold: float = 0.0) -> Sam2MemorySegmenter:
        """Random-weight model from :func:`tiny_sam2_config`, seeded with ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return cls(config=tiny_sam2_config(), device=device, threshold=threshold)

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None) -> dict[str, SegmentationOutput | None]:
        """Every structure named in ``boxes_xyxy_px`` -> (H, W) bool mask at the target size.

        A structure whose box is None (or clips to nothing) is segmented from memory alone; a box
        refines the memory-conditioned prediction. ``score``: see :meth:`scores`. The mask may be
        empty when SAM2 predicts the object absent.
        """
        names = list(boxes_xyxy_px)
        target = self._check_inputs(target, names, reference)
        if not names:
            return {}
        hw = target.shape
        boxes = {n: clip_box(b, *hw) if b is not None else None for n, b in boxes_xyxy_px.items()}
        video = two_frame_video(reference.image, target)
        masks = [reference.masks[n] for n in names]
        low_res, object_logits = self._track(video, masks, [boxes[n] for n in names])
        logits = self.processor.post_process_masks([low_res], original_sizes=[list(hw)], binarize=False)[0]
        logits = logits[:, 0].float().cpu().numpy()
        scores = self.scores(logits, object_logits)
        return {n: SegmentationOutput(logits[i] > self.threshold, float(scores[i])) for i, n in enumerate(names)}

    def scores(self, logits: np.ndarray, object_logits=None) -> np.ndarray:
        """(N,) scores in [0, 1]: sigmoid of the (N,) object-presence logits when the transformers version
        returns them, else the mean probability inside each (H, W) thresholded mask of ``logits`` (N, H, W)."""
        if object_logits is not None:
            return torch.sigmoid(object_logits.float()).cpu().numpy()
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        inside = logits > self.threshold
        area = inside.sum(axis=(1, 2))
        return np.where(area > 0, (probs * inside).sum(axis=(1, 2)) / np.maximum(area, 1), 0.0)

    @staticmethod
    def _check_inputs(target: np.ndarray, names: list[str], reference: AnnotatedImage | None) -> np.ndarray:
        """Validate the target (H, W) and the reference masks; returns the target as float32."""
        target = np.asarray(target, dtype=np.float32)
        if target.ndim != 2:
            raise RauInputError(f"target: expected a 2D (H, W) image, got shape {target.shape}")
        if reference is None:
            raise RauInputError(
                "reference: the sam2-memory segmenter needs an annotated reference image (its masks are "
                "the memory); pass one or use the medsam segmenter with boxes"
            )
        reference.require_nonempty(names, role="reference")
        return target

    def _track(self, video: np.ndarray, masks: list[np.ndarray], boxes: list[Box | None]):
        """Reference masks on frame 0 -> memory -> frame 1 from memory alone -> boxes on frame 1.

        Args:
            video: (2, H, W, 3) float32 in [0, 255], frame 0 = reference, frame 1 = target.
            masks: one (Hr, Wr) bool reference mask per structure.
            boxes: one pixel-edge xyxy target box (or None) per structure.

        Returns:
            (N, 1, h, w) low-resolution mask logits of frame 1 and (N,) object-presence logits (or None).
        """
        obj_ids = list(range(1, len(masks) + 1))
        boxed = [i for i, b in enumerate(boxes) if b is not None]
        with torch.inference_mode():
            session = self._session_with_reference(video, masks, obj_ids)
            out = self.model(session, frame_idx=TARGET_FRAME)  # no prompt: memory alone; frame 1 is now tracked
            low_res, object_logits = self._by_object(out, session, obj_ids)
            if boxed:
                self.processor.add_inputs_to_inference_session(
                    session, frame_idx=TARGET_FRAME, obj_ids=[obj_ids[i] for i in boxed],
                    input_boxes=[[list(boxes[i]) for i in boxed]],
                )
                out = self.model(session, frame_idx=TARGET_FRAME)  # memory + box
                refined, refined_logits = self._by_object(out, session, obj_ids)
                low_res[boxed] = refined[boxed]
                if object_logits is not None:
                    object_logits[boxed] = refined_logits[boxed]
        return low_res, object_logits

    def _session_with_reference(self, video: np.ndarray, masks: list[np.ndarray], obj_ids: list[int]):
        """New 2-frame session; all reference masks added on frame 0 in one call, frame 0 run (memory).

        The vision-feature cache holds both frames, so each frame is encoded exactly once.
        """
        session = self.processor.init_video_session(
            video=video, inference_device=self.device, max_vision_features_cache_size=2, dtype=torch.float32
        )
        self.processor.add_inputs_to_inference_session(  # the session keeps and mutates this list: a copy
            session, frame_idx=REFERENCE_FRAME, obj_ids=list(obj_ids),
            input_masks=[np.asarray(m, dtype=bool) for m in masks],
        )
        self.model(session, frame_idx=REFERENCE_FRAME)
        return session

    @staticmethod
    def _by_object(out, session, obj_ids: list[int]):
        """Model output -> ((N, 1, h, w) mask logits, (N,) object logits or None), in ``obj_ids`` order.

        Older transformers (4.5x) return neither ``object_ids`` (the order is then the session's object
        order) nor ``object_score_logits`` (None). Copies, so later runs cannot alter them.
        """
        ids = list(getattr(out, "object_ids", None) or session.obj_ids)
        order = [ids.index(i) for i in obj_ids]
        low_res = out.pred_masks[order].clone()
        object_logits = getattr(out, "object_score_logits", None)
        if object_logits is not None:
            object_logits = object_logits.reshape(len(ids), -1)[order, 0].clone()
        return low_res, object_logits
