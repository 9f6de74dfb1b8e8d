"""Model loading: `tiny-random`, a local `save_pretrained` directory or a hub id, into one `ModelBundle`."""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from serve_app.core.config import Config
from serve_app.core.errors import ModelLoadError
from serve_app.image.roi_align import install_roi_align_fallback
from serve_app.image.sources import (  # noqa: F401 - probe_model re-exported
    FULL_RANDOM, TINY_LITE, TINY_SEED, built_in_code, checkpoint_arch, load_error, probe_model, resolve_source,
    tiny_seed,
)

logger = logging.getLogger(__name__)

TINY_INIT_RANGE = 0.15  # at the default 0.02, tiny mask logits are ~1e-3 and every pixel sits on the threshold
TINY_PRESENCE_BIAS = 3.0
TEXT_LENGTH = 32  # SAM3's processor pads every prompt to 32 tokens
HASH_TOKENIZER_FILE = "sam3_serve_tokenizer.json"


def tiny_video_config():
    """The real SAM3 classes at a toy size: 112 px images, 32-wide layers. Masks mean nothing."""
    from transformers import Sam3VideoConfig

    img, patch = 112, 14
    grid = img // patch
    vit = dict(
        model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=img, patch_size=patch, window_size=4, global_attn_indexes=[1],
        pretrain_image_size=img,
    )
    width = 128  # > 64: the video tracker reshapes object pointers into 64-channel memory tokens only when wider
    vision = dict(
        model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=width,
        backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
    )
    text = dict(
        model_type="clip_text_model", vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
        bos_token_id=998, eos_token_id=999, pad_token_id=999,
    )
    small = dict(hidden_size=width, num_layers=1, num_attention_heads=2, intermediate_size=2 * width)
    detector = dict(
        vision_config=vision, text_config=text, geometry_encoder_config=small, detr_encoder_config=small,
        detr_decoder_config=dict(small, num_queries=16),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=2),
    )
    tracker = dict(
        image_size=img, vision_config=vision,
        prompt_encoder_config=dict(hidden_size=width, image_size=img, patch_size=patch),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=2 * width, num_attention_heads=2, iou_head_hidden_dim=width),
        memory_attention_hidden_size=width, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * width, memory_encoder_hidden_size=width,
        memory_encoder_output_channels=64,  # memory attention hard-codes kv_in_dim=64
        mask_downsampler_embed_dim=width, memory_fuser_embed_dim=width, memory_fuser_intermediate_dim=2 * width,
        memory_attention_rope_feat_sizes=[grid, grid],
    )
    # hotstart_delay: the real model holds 15 frames back to confirm new objects; 2 keeps tiny videos streaming
    config = Sam3VideoConfig(
        detector_config=detector, tracker_config=tracker, low_res_mask_size=grid * 4, hotstart_delay=2,
        hotstart_unmatch_thresh=2, hotstart_dup_thresh=2,
    )
    for sub in _all_configs(config):
        if hasattr(sub, "initializer_range"):
            sub.initializer_range = TINY_INIT_RANGE
    return config


def _all_configs(config) -> list:
    """A config and every nested sub-config."""
    found = [config]
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            found.extend(_all_configs(value))
    return found


def build_tiny_random(seed: int = TINY_SEED):
    """`tiny-random` (`tiny-random:<seed>` for other weights): wide enough init that mask logits are far from 0 and
    scores spread over (0, 1)."""
    from transformers import Sam3VideoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3VideoModel(tiny_video_config())
    with torch.no_grad():  # random presence logits sit near 0 (p=0.5) and would cap every score at 0.5
        model.detector_model.detr_decoder.presence_head.layer3.bias.fill_(TINY_PRESENCE_BIAS)
    return model.eval()


def tiny_lite_config():
    """`tiny-random-lite`: a `sam3_lite_text` model (SAM3's detector with the small MobileCLIP-style text encoder)
    at tiny-random's size, sharing its vision, DETR and mask-decoder shapes."""
    from transformers import Sam3LiteTextConfig

    detector = tiny_video_config().detector_config.to_dict()
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, repmixer_kernel_size=3)
    config = Sam3LiteTextConfig(
        vision_config=detector["vision_config"], text_config=text,
        geometry_encoder_config=detector["geometry_encoder_config"],
        detr_encoder_config=detector["detr_encoder_config"], detr_decoder_config=detector["detr_decoder_config"],
        mask_decoder_config=detector["mask_decoder_config"],
    )
    for sub in _all_configs(config):
        if hasattr(sub, "initializer_range"):
            sub.initializer_range = TINY_INIT_RANGE
    return config


def build_tiny_lite():
    from transformers import Sam3LiteTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Sam3LiteTextModel(tiny_lite_config())
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(TINY_PRESENCE_BIAS)
    return model.eval()


class HashTokenizer:
    """A vocabulary-free tokenizer for `tiny-random`: each word hashes to a stable id, so prompts differ."""

    def __init__(self, vocab_size: int = 1000, max_length: int = TEXT_LENGTH) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.bos_id, self.eos_id = vocab_size - 2, vocab_size - 1

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        body = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words][: self.max_length - 2]
        return [self.bos_id, *body, self.eos_id]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.full((len(texts), self.max_length), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        payload = {"type": "hash", "vocab_size": self.vocab_size, "max_length": self.max_length}
        Path(directory, HASH_TOKENIZER_FILE).write_text(json.dumps(payload))


class HFTokenizer:
    """The checkpoint's own tokenizer (CLIP BPE for facebook/sam3), padded the way Sam3Processor pads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]


@dataclass
class ModelBundle:
    """Everything the engine needs, sharing one copy of the vision backbone.

    A `sam3_lite_text` model is a detector alone: `video`, `tracker` and `video_tracker` are None, and it serves
    concept prompts only."""

    name: str
    video: torch.nn.Module | None  # Sam3VideoModel
    detector: torch.nn.Module  # Sam3Model (the video model's own detector), or a Sam3LiteTextModel
    tracker: torch.nn.Module | None  # Sam3TrackerModel assembled from the video model's parts
    video_tracker: torch.nn.Module | None  # Sam3TrackerVideoModel assembled the same way (click tracking in videos)
    tokenizer: HashTokenizer | HFTokenizer
    device: torch.device
    dtype: torch.dtype

    @property
    def arch(self) -> str:
        return "sam3_video" if self.video is not None else "sam3_lite_text"

    @property
    def image_size(self) -> int:
        return int(self.detector.config.vision_config.backbone_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.detector.config.vision_config.backbone_config.patch_size)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.detector.vision_encoder.backbone


def resolve_device(config: Config) -> tuple[torch.device, torch.dtype]:
    """`auto` is cuda with bfloat16 when a GPU is visible, else cpu with float32."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"SAM3_DEVICE={config.device} but no CUDA device is visible; use SAM3_DEVICE=cpu")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


def assemble_image_tracker(video: torch.nn.Module) -> torch.nn.Module:
    """A `Sam3TrackerModel` whose backbone is the detector's and whose neck and heads are the video tracker's."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    tracker_cfg = video.config.tracker_config
    cfg = Sam3TrackerConfig(
        vision_config=video.config.detector_config.vision_config.to_dict(),
        prompt_encoder_config=tracker_cfg.prompt_encoder_config.to_dict(),
        mask_decoder_config=tracker_cfg.mask_decoder_config.to_dict(),
    )
    with torch.device("meta"):  # no memory for a second backbone: it is replaced below
        tracker = Sam3TrackerModel(cfg)
    wanted = {k for k in tracker.state_dict() if not k.startswith("vision_encoder.")}
    source = video.tracker_model.state_dict()
    missing = wanted - set(source)
    if missing:
        raise ModelLoadError(f"tracker weights missing from the checkpoint: {sorted(missing)[:5]}")
    tracker.load_state_dict({k: source[k] for k in wanted}, strict=False, assign=True)
    tracker.vision_encoder.backbone = video.detector_model.vision_encoder.backbone
    tracker.vision_encoder.neck = video.tracker_neck
    return tracker.eval()


def assemble_video_tracker(video: torch.nn.Module) -> torch.nn.Module:
    """A `Sam3TrackerVideoModel` (click/box tracking) on the detector's backbone and the video model's tracker."""
    from transformers import Sam3TrackerVideoModel
    from transformers.models.sam3.modeling_sam3 import Sam3VisionModel

    with torch.device("meta"):
        tracker = Sam3TrackerVideoModel(video.config.tracker_config, remove_vision_encoder=True)
        vision = Sam3VisionModel(video.config.detector_config.vision_config)
    tracker.load_state_dict(video.tracker_model.state_dict(), strict=True, assign=True)
    live_buffers = dict(video.tracker_model.named_buffers())  # non-persistent ones (rope tables) too
    for name, buffer in list(tracker.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            tracker.get_submodule(owner)._buffers[attr] = live_buffers[name]
    vision.backbone = video.detector_model.vision_encoder.backbone
    vision.neck = video.tracker_neck
    tracker.vision_encoder = vision
    return tracker.eval()


def _load_video_model(name: str, dtype: torch.dtype):
    from transformers import Sam3VideoModel

    if name == TINY_LITE:
        return build_tiny_lite().to(dtype)
    if (seed := tiny_seed(name)) is not None:
        return build_tiny_random(seed).to(dtype)
    if name == FULL_RANDOM:
        from transformers import Sam3VideoConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            return Sam3VideoModel(Sam3VideoConfig()).to(dtype).eval()
    arch = checkpoint_arch(name)
    try:
        if arch == "sam3_lite_text":
            from transformers import Sam3LiteTextModel

            model = Sam3LiteTextModel.from_pretrained(resolve_source(name), dtype=dtype)
        else:
            model = Sam3VideoModel.from_pretrained(resolve_source(name), dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise load_error(name, exc) from exc
    return _own_storage(model)


def _own_storage(model: torch.nn.Module) -> torch.nn.Module:
    """Copy weights out of the safetensors mmap into fresh, aligned storage.

    Tensors loaded from the file start at 8-byte offsets; CPU kernels then take another SIMD path and
    round differently (~1e-7), so the same weights would not give bitwise-equal results.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def _load_tokenizer(name: str, vocab_size: int):
    if built_in_code(name):
        return HashTokenizer(vocab_size)
    local = Path(name).expanduser()
    marker = local / HASH_TOKENIZER_FILE
    if marker.is_file():
        spec = json.loads(marker.read_text())
        return HashTokenizer(int(spec["vocab_size"]), int(spec.get("max_length", TEXT_LENGTH)))
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(local) if local.exists() else name))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer of SAM3 model {name!r}: {exc}") from exc


def load_video_model(config: Config) -> torch.nn.Module:
    """The Sam3VideoModel alone, on the CPU in the configured dtype (to ship to other processes)."""
    return _load_video_model(config.model, resolve_device(config)[1]).eval()


def load_bundle(config: Config, video: torch.nn.Module | None = None) -> ModelBundle:
    """Load the configured model once (or adopt `video`, an already loaded copy) on the configured device."""
    install_roi_align_fallback()
    device, dtype = resolve_device(config)
    video = (video if video is not None else _load_video_model(config.model, dtype)).eval()
    if video.config.model_type == "sam3_lite_text":  # a detector alone: concept prompts only
        tokenizer = _load_tokenizer(config.model, video.config.text_config.vocab_size)
        video.to(device)
        logger.info("loaded SAM3-LiteText model %s on %s (%s)", config.model, device, dtype)
        return ModelBundle(config.model, None, video, None, None, tokenizer, device, dtype)
    tokenizer = _load_tokenizer(config.model, video.config.detector_config.text_config.vocab_size)
    tracker = assemble_image_tracker(video)
    video_tracker = assemble_video_tracker(video)
    for module in (video, tracker, video_tracker):
        module.to(device)
    logger.info("loaded SAM3 model %s on %s (%s)", config.model, device, dtype)
    return ModelBundle(config.model, video, video.detector_model, tracker, video_tracker, tokenizer, device, dtype)


def save_bundle(bundle: ModelBundle, directory: str | os.PathLike) -> None:
    """Write the model and its tokenizer in `save_pretrained` layout, loadable with SAM3_MODEL=<directory>."""
    (bundle.video if bundle.video is not None else bundle.detector).save_pretrained(directory)
    tok = bundle.tokenizer
    (tok.tokenizer if isinstance(tok, HFTokenizer) else tok).save_pretrained(directory)
