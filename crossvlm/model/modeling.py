"""`CrossVLM`: a vision tower (CLIP or SigLIP), a projector and a stock Qwen3ForCausalLM, held by composition.

The LLM's modules are never patched. Visual tokens replace the `<|image_pad|>` positions of the
token embeddings (`masked_scatter`) at prefill; everything after that is the LLM's own forward. In
training the loss is computed only where labels exist, so a [batch, seq, vocab] logits tensor is
never built.
"""

from __future__ import annotations

import contextlib
import inspect
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Qwen3ForCausalLM, Qwen3Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from crossvlm import sources
from crossvlm.errors import ImageTokenMismatch, ModelLoadError
from crossvlm.model.configuration import CrossVLMConfig
from crossvlm.model.packing import packed_attention_kwargs
from crossvlm.model.projector import CrossAttentionProjector, MLPProjector
from crossvlm.model.tiling import TileLayout, tile_layout
from crossvlm.model.vision import cut_tower, dropped_prefixes, kind_of, tower_kind

IGNORE_INDEX = -100


def labelled(hidden: torch.Tensor, labels: torch.Tensor, label_positions: torch.Tensor | None = None):
    """The hidden states (n, D) of the n positions whose next token is labelled, and those tokens (n,):
    by `label_positions` (`label_positions_of`) when given, else by a boolean mask (a host sync on a GPU)."""
    if label_positions is None:
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        selected = targets != IGNORE_INDEX
        return hidden[:, :-1][selected], targets[selected]
    return hidden.flatten(0, 1).index_select(0, label_positions), labels.flatten().index_select(0, label_positions + 1)


def _host_indices(indices: np.ndarray, pin: bool) -> torch.Tensor:
    out = torch.from_numpy(indices.astype(np.int64))
    return out.pin_memory() if pin else out  # pinned: copied to the GPU without blocking


def image_positions_of(input_ids: torch.Tensor, image_token_id: int, pin: bool = False) -> torch.Tensor:
    """Flat indices (into B·T) of a host batch's <|image_pad|> tokens, in order: `CrossVLM.embed`'s
    `image_positions`."""
    return _host_indices(np.flatnonzero(input_ids.numpy() == image_token_id), pin)


def label_positions_of(labels: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """Flat indices (into B·T) of a host batch's positions whose next token is labelled, in order:
    `CrossVLM.loss_from_hidden`'s `label_positions` (a row's last position predicts nothing)."""
    targets = labels.numpy() != IGNORE_INDEX
    targets[:, 0] = False  # position t predicts token t + 1: a row's first token is nobody's target
    return _host_indices(np.flatnonzero(targets) - 1, pin)


# transformers renamed the decoder's cache argument (`past_key_values` -> `cache`) within 5.x.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def _own_report():
    """transformers' loading report (a table of key problems) silenced: `_check_loading_info` refuses any
    such problem in one message of its own."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _keys(keys: list[str], shown: int = 8) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def _check_loading_info(info: dict, source: str, allowed_unexpected: tuple[str, ...] = ()) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(allowed_unexpected))
    mismatched = sorted(f"{m[0]} {list(m[1])} in the file, {list(m[2])} by config.json"
                        if isinstance(m, (tuple, list)) and len(m) == 3 else str(m)
                        for m in (info.get("mismatched_keys") or []))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_keys(unexpected)}")
        if mismatched:
            parts.append(f"keys whose shapes differ from config.json's sizes ({len(mismatched)}): {_keys(mismatched)}")
        raise ModelLoadError(f"weights in {source} do not match the model: " + "; ".join(parts)
                             + "; point at an unmodified checkpoint of the right architecture")


def _hub_config(source: sources.Source, want: str) -> None:
    """A hub id's config.json, fetched before its weights: it must name the `want` kind."""
    if not source.local:
        try:
            config, _ = PretrainedConfig.get_config_dict(source.name)
        except OSError as err:
            raise ModelLoadError(f"cannot load {source.name}: {err}") from err
        sources.check_config_kind(config, source.name, want)


def _load_error(err: Exception, name_or_path, what: str) -> ModelLoadError:
    """A transformers / safetensors load failure as one message naming the source."""
    return ModelLoadError(f"cannot load {what} from {name_or_path}: {type(err).__name__}: {err}")


def load_llm(name_or_path: str | Path, dtype: torch.dtype | None = None) -> Qwen3ForCausalLM:
    """Load a Qwen3ForCausalLM from a hub id or a local directory, every key matched."""
    _hub_config(sources.check(name_or_path, "llm", parts=False), "llm")
    try:
        with _own_report():
            llm, info = Qwen3ForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, output_loading_info=True)
    except (OSError, SafetensorError) as err:
        raise _load_error(err, name_or_path, "the LLM") from err
    _check_loading_info(info, str(name_or_path))
    return llm


def load_vision(name_or_path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a vision tower from a hub id or a local directory, every key matched; its class (CLIP or
    SigLIP) is the one its config.json names (see crossvlm.model.vision).

    A full image-text checkpoint (openai/clip-vit-base-patch16, google/siglip-base-patch16-224)
    works too: its text tower's keys are the only ones allowed to go unused.
    """
    source = sources.find(name_or_path)  # a missing folder is named here, not looked for on the hub
    try:
        config, _ = PretrainedConfig.get_config_dict(str(name_or_path))
        if sources.kind_of_config(config) in ("crossvlm", "llm"):  # other kinds: tower_kind says which it takes
            sources.check_config_kind(config, str(name_or_path), "vision")
        kind = tower_kind(config.get("model_type"), f"the vision tower at {name_or_path}")
        if source.local:
            sources.check(name_or_path, "vision", parts=False)  # whole weights
        model_class, _ = kind.classes()
        with _own_report():
            vision, info = model_class.from_pretrained(str(name_or_path), dtype=dtype, output_loading_info=True)
    except (OSError, SafetensorError) as err:
        raise _load_error(err, name_or_path, "the vision tower") from err
    _check_loading_info(info, str(name_or_path), allowed_unexpected=kind.other_parts)
    return vision


def labelled_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (n, V) against `targets` (n,), in float32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _cache_of(output):
    cache = getattr(output, "past_key_values", None)
    return cache if cache is not None else getattr(output, "cache", None)


class CrossVLM(PreTrainedModel):
    """Vision tower + projector + Qwen3ForCausalLM. See DESIGN.md for the contracts."""

    config_class = CrossVLMConfig
    base_model_prefix = "crossvlm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["Qwen3DecoderLayer", "CLIPEncoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: CrossVLMConfig, llm: Qwen3ForCausalLM | None = None,
                 vision: PreTrainedModel | None = None):
        super().__init__(config)
        if vision is None:
            model_class, _ = tower_kind(config.vision_config.model_type).classes()
            vision = model_class(config.vision_config)
        # Only the layers up to the one the projector reads exist (see crossvlm.model.vision).
        self.vision = cut_tower(vision, config.vision_feature_layer)
        self.llm = llm if llm is not None else Qwen3ForCausalLM(config.text_config)
        vision_dim, llm_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        if config.projector_type == "cross_attn":
            self.projector = CrossAttentionProjector(
                vision_dim, llm_dim, config.num_patches, num_queries=config.num_queries,
                num_layers=config.projector_layers, num_heads=config.projector_heads,
                hidden_dim=config.projector_hidden_size, locality=config.projector_locality,
                position=config.projector_position, kv_norm=config.projector_kv_norm, init=config.projector_init,
                max_tiles=config.max_tiles, tile_queries=config.tile_queries,
            )
        else:
            self.projector = MLPProjector(vision_dim, llm_dim, config.num_patches)
        self.post_init()
        self.apply_vision_freeze()
        self.compile_loss(False)  # eager until asked

    def compile_loss(self, enable: bool = True) -> None:
        """Compile the LM head + cross-entropy into one graph (`enable=False`: back to eager).

        Eagerly the float32 copy of the (n × vocabulary) logits is written, read by log-softmax, and
        its gradient written and cast back; compiled, the logits stay in the head's dtype and the
        softmax, target pick and gradient are fused reductions over them. Shapes are dynamic in n
        (labelled rows vary per batch); no CUDA graphs for that reason.
        """
        self._ce_sum = torch.compile(labelled_ce_sum) if enable else labelled_ce_sum

    def apply_vision_freeze(self) -> None:
        """Freeze the vision tower if the config says so (loading makes fresh, trainable tensors)."""
        if self.config.freeze_vision:
            self.vision.requires_grad_(False)
            self.vision.eval()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_base_models(
        cls,
        llm: str | Path = "Qwen/Qwen3-0.6B",
        vision: str | Path = "openai/clip-vit-base-patch16",
        tokenizer=None,
        dtype: torch.dtype | None = None,
        **projector_kwargs,
    ) -> "CrossVLM":
        """A new VLM from a base LLM and vision tower (hub ids or local paths), projector fresh.

        `projector_kwargs` are CrossVLMConfig fields (projector_type, num_queries, ...). The
        vision-token ids are read from the LLM's tokenizer.
        """
        from transformers import AutoTokenizer

        from crossvlm.model.tokens import VisionTokenIds

        llm_model = load_llm(llm, dtype)
        vision_model = load_vision(vision, dtype)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(llm))
            except (OSError, ValueError, ImportError, TypeError) as err:
                raise _load_error(err, llm, "the tokenizer") from err
        try:
            ids = VisionTokenIds.from_tokenizer(tokenizer)
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
        config = CrossVLMConfig(
            text_config=llm_model.config, vision_config=vision_model.config,
            image_token_id=ids.pad, vision_start_token_id=ids.start, vision_end_token_id=ids.end,
            llm_name_or_path=str(llm), vision_name_or_path=str(vision), **projector_kwargs,
        )
        model = cls(config, llm=llm_model, vision=vision_model)
        model.projector.to(llm_model.dtype)
        embed_std = llm_model.get_input_embeddings().weight.float().std().item()
        model.projector.match_output_scale(embed_std * config.projector_output_scale)
        return model

    def _init_weights(self, module):
        # The projector's modules initialise themselves in their constructors (and its output
        # scale is matched to the LLM in `from_base_models`); everything else gets the standard
        # treatment, which also restores unsaved buffers such as the LLM's rotary frequencies.
        if any(module is m for m in self.projector.modules()):
            return
        super()._init_weights(module)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()  # a frozen tower stays in eval mode (no dropout, fixed statistics)
        return self

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    @property
    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config.json + model.safetensors, and the LLM's generation defaults (stop tokens)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.llm.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved CrossVLM directory; every key must match."""
        from transformers import GenerationConfig

        kwargs["output_loading_info"] = True
        # Shapes that differ from config.json's sizes are reported by `_check_loading_info`, key by key.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        _hub_config(sources.check(pretrained_model_name_or_path, "crossvlm", parts=False), "crossvlm")
        try:
            with _own_report():
                model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (OSError, SafetensorError) as err:
            raise _load_error(err, pretrained_model_name_or_path, "a crossvlm model") from err

        # Directories saved before the tower was cut hold the layers past the feature layer: skip them.
        _check_loading_info(info, str(pretrained_model_name_or_path),
                            allowed_unexpected=dropped_prefixes(model.vision, model.config.vision_feature_layer))
        model.apply_vision_freeze()
        path = Path(pretrained_model_name_or_path)
        if (path / "generation_config.json").exists():
            model.llm.generation_config = GenerationConfig.from_pretrained(path)
        return model

    # -- images -----------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of the configured layer, CLS dropped (CLIP; SigLIP has none): (N, P, Dv).

        The tower is cut at that layer, so its last hidden state is the one the projector reads.
        """
        pixel_values = pixel_values.to(self.vision.dtype)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(grad):  # no autograd graph through a frozen tower
            out = self.vision(pixel_values=pixel_values)
        first_patch = 1 if kind_of(self.vision).class_token else 0
        return out.last_hidden_state[:, first_patch:]

    def tile_layout(self, image_grids) -> TileLayout:
        """Where the views of images with `image_grids` ((N, 2) rows, columns, on the host) go."""
        return tile_layout(image_grids, self.num_image_tokens, self.config.tile_tokens)

    def encode_images(self, pixel_values: torch.Tensor, image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens for every image in the batch at once: (N, M, D_llm).

        With `image_grids` ((N, 2) rows and columns of each image's tiles, a host tensor:
        crossvlm.model.tiling), `pixel_values` holds every image's views (V, 3, H, W), its thumbnail
        then its tiles: all views go through the tower in one call, the thumbnails through the
        projector in one and all tiles in another (each view's queries carrying its place), and the
        result is every image's tokens in order, (sum of tokens, D_llm). A tiled model's images given
        without grids are single views: thumbnails, as a (1, 1) grid makes them.
        """
        features = self.vision_features(pixel_values).to(self._projector_dtype)  # (V, P, Dv)
        if image_grids is None and self.config.max_tiles > 1:  # a tiled model's images without grids: thumbnails
            image_grids = [(1, 1)] * features.shape[0]
        if image_grids is None:
            return self.projector(features)
        layout = self.tile_layout(image_grids)
        if len(layout.is_tile) != features.shape[0]:
            raise ImageTokenMismatch(f"the images' grids make {len(layout.is_tile)} views but {features.shape[0]} "
                                     "were given; make pixel values and grids with the same processor")
        device = features.device
        places = torch.from_numpy(layout.places).to(device, non_blocking=True)  # (V, 2)
        tile = torch.from_numpy(layout.is_tile)
        thumbs, tiles = (torch.from_numpy(np.flatnonzero(m)).to(device, non_blocking=True) for m in (~tile, tile))
        parts = [self.projector(features.index_select(0, thumbs), places.index_select(0, thumbs))]  # (N, M, D)
        if len(tiles):
            parts.append(self.projector(features.index_select(0, tiles), places.index_select(0, tiles), tiles=True))  # (K, T, D)
        elif self.training and torch.is_grad_enabled():  # the tiles' own parameters join the graph all the same
            parts[0] = parts[0] + 0.0 * sum(p.sum() for p in self._tile_only_parameters())
        flat = torch.cat([part.flatten(0, 1) for part in parts])  # (N·M + K·T, D): thumbnails' tokens, then tiles'
        return flat.index_select(0, torch.from_numpy(layout.order).to(device, non_blocking=True))

    def _tile_only_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.projector.tile_queries,) if p is not None]

    def check_image_tokens(self, input_ids: torch.Tensor, num_images: int, image_grids=None) -> None:
        """Raise ImageTokenMismatch unless every sample holds whole image spans, one per image.

        Reads the ids on the host: callers with host copies of the batch (the trainer, the chat
        model) run it there, so the forward on a GPU needs no host sync for it. With `image_grids`
        (tiled images) each image's span holds the tokens its grid gives it.
        """
        if image_grids is not None:
            return self._check_tiled_tokens(input_ids, self.tile_layout(image_grids).tokens)
        m = self.num_image_tokens
        # numpy, not torch: on the host torch's intra-op threads compete with a loader's workers, which
        # made this count take 20-30 ms a step in training (docs/PERFORMANCE.md, run 5)
        per_sample = np.count_nonzero(input_ids.numpy() == self.config.image_token_id, axis=1).tolist()
        bad = [(i, n) for i, n in enumerate(per_sample) if n % m]
        if bad:
            desc = ", ".join(f"sample {i} has {n}" for i, n in bad)
            raise ImageTokenMismatch(
                f"each image takes exactly {m} <|image_pad|> tokens, but {desc} "
                f"(not a multiple of {m}); expand every <image> mark with the processor"
            )
        spans = [n // m for n in per_sample]
        if sum(spans) != num_images:
            desc = ", ".join(f"sample {i}: {s}" for i, s in enumerate(spans) if s)
            raise ImageTokenMismatch(
                f"the batch has {sum(spans)} image spans ({desc or 'none'}) but {num_images} images were given"
            )

    def _check_tiled_tokens(self, input_ids: torch.Tensor, tokens: list[int]) -> None:
        ids = input_ids.numpy()
        pads = np.count_nonzero(ids == self.config.image_token_id, axis=1)  # (B,)
        spans = np.count_nonzero(ids == self.config.vision_start_token_id, axis=1)  # (B,)
        if spans.sum() != len(tokens):
            desc = ", ".join(f"sample {i}: {s}" for i, s in enumerate(spans.tolist()) if s)
            raise ImageTokenMismatch(f"the batch has {spans.sum()} image spans ({desc or 'none'}) but "
                                     f"{len(tokens)} images were given")
        ends = np.cumsum(spans).tolist()
        expected = [sum(tokens[end - n:end]) for n, end in zip(spans.tolist(), ends)]  # each sample's images' tokens
        bad = [(i, n, e) for i, (n, e) in enumerate(zip(pads.tolist(), expected)) if n != e]
        if bad:
            desc = ", ".join(f"sample {i} has {n} where its images' tiles take {e}" for i, n, e in bad)
            raise ImageTokenMismatch(f"<|image_pad|> tokens do not match the tiled images: {desc}; expand every "
                                     "<image> mark with the processor's token count for that image")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_positions: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
              image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with visual tokens scattered into the <|image_pad|> positions: (B, T, D).

        `image_positions` (the flat indices of those positions, `image_positions_of`), when the caller
        has them from the host, keep a GPU forward and backward free of host syncs: a boolean mask's
        scatter finds its positions with `nonzero`, which waits for the GPU twice a step. A caller that
        passes them has checked the host ids (`check_image_tokens`), as the trainer and the engine do.
        `image_features`: the images' visual tokens (N, M, D) when the caller has encoded them already
        (the engine replays the image path as a CUDA graph). `image_grids`: the tiled images' grids
        (`encode_images`), on the host."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if image_positions is None and input_ids.device.type == "cpu":  # (a caller with positions checked)
            self.check_image_tokens(input_ids, num_images, image_grids)
        elif image_positions is None:  # here without a host sync
            expected = (num_images * self.num_image_tokens if image_grids is None
                        else sum(self.tile_layout(image_grids).tokens))
            torch._assert_async((input_ids == self.config.image_token_id).sum() == expected,
                                "the number of <|image_pad|> tokens does not match the images given")
        if num_images:
            visual = (self.encode_images(pixel_values, image_grids) if image_features is None
                      else image_features).to(embeds.dtype)  # (N, M, D), or (tokens, D) tiled
            visual = visual.reshape(-1, visual.shape[-1])  # (N·M, D)
            if image_positions is not None:
                return embeds.flatten(0, 1).index_copy(0, image_positions, visual).view_as(embeds)
            is_pad = input_ids == self.config.image_token_id  # (B, T)
            embeds = embeds.masked_scatter(is_pad.unsqueeze(-1), visual)
        elif self.training and any(p.requires_grad for p in chain(self.vision.parameters(),
                                                                  self.projector.parameters())):
            # A batch without images still runs a blank image through the trainable image path (with
            # zero effect), so data-parallel ranks agree on which parameters have gradients.
            size, grids = self.config.vision_config.image_size, None
            if self.config.max_tiles > 1:  # a thumbnail and two tiles: every tile parameter takes part
                grids = torch.tensor([[1, 2]])
            blank = torch.zeros(1 if grids is None else 3, 3, size, size, device=embeds.device)
            embeds = embeds + 0.0 * self.encode_images(blank, grids).sum().to(embeds.dtype)
        return embeds

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        image_positions: torch.LongTensor | None = None,
        label_positions: torch.LongTensor | None = None,
        image_grids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. With `labels`, returns the loss over labelled positions and no logits.

        `num_items_in_batch` (the labelled-token count over all micro-batches and ranks of a step)
        turns the loss into a sum divided by it, so gradient accumulation and data parallelism
        weight every token equally. `document_ids` (B, T) marks packed rows (crossvlm.model.packing):
        each token then attends only within its own document, through the LLM's attention implementation.
        `image_positions` and `label_positions` (`image_positions_of`, `label_positions_of`), made on
        the host, spare the GPU step its host syncs (the trainer passes them). `image_grids` (N, 2), on
        the host: the tiled images' grids, `pixel_values` then holding their views (`encode_images`).
        """
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        if inputs_embeds is None:
            if cache is not None and cache.get_seq_length() > 0:
                pixel_values = None  # images are merged at prefill only
            inputs_embeds = self.embed(input_ids, pixel_values, image_positions, image_grids=image_grids)
        if cache is not None:
            kwargs[_CACHE_KWARG] = cache
        if document_ids is not None:
            with torch.profiler.record_function("model.document_mask"):
                kwargs.update(packed_attention_kwargs(self.llm.config._attn_implementation, document_ids))
            attention_mask = kwargs.pop("attention_mask")
        out = self.llm.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state  # (B, T, D)
        if labels is not None:
            loss = self.loss_from_hidden(hidden, labels, num_items_in_batch, label_positions)
            return CausalLMOutputWithPast(loss=loss, past_key_values=_cache_of(out))
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.llm.lm_head(hidden[:, keep])  # (B, T', V)
        return CausalLMOutputWithPast(logits=logits, past_key_values=_cache_of(out))

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None,
                         label_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy computed only at labelled positions (`label_positions`: the flat
        indices of the positions whose next token is labelled, `label_positions_of`; found here
        with a boolean mask, a host sync on a GPU, when not given)."""
        h, targets = labelled(hidden, labels, label_positions)
        loss_sum = self._ce_sum(self.llm.lm_head, h, targets)
        denom = num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1)
        return loss_sum / denom

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_grids: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.LongTensor:
        """Generate with images: the image-merged embeddings are the prefill, then the stock
        Qwen3 `generate()` (KV cache, sampling, streamers, stopping) takes over.

        Returns the prompt ids followed by the new tokens, like `transformers` does. Use left
        padding for batches.
        """
        embeds = self.embed(input_ids, pixel_values, image_grids=image_grids)
        return self.llm.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )
