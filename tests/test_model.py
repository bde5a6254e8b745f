"""The CrossVLM model against the stock transformers models it is built from."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, Qwen3ForCausalLM

from crossvlm.errors import ImageTokenMismatch, ModelLoadError
from crossvlm.model import CrossVLM, load_vision
from crossvlm.model.modeling import image_positions_of, label_positions_of
from crossvlm.model.processor import CrossVLMProcessor, to_rgb
from crossvlm.model.projector import CrossAttentionProjector, sincos_2d
from crossvlm.model.vision import dropped_prefixes, vision_layers


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    return CrossVLM.from_pretrained(tiny_vlm_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir):
    return CrossVLMProcessor.from_pretrained(tiny_vlm_dir)


def _image_prompt(processor, n_before=3, n_after=5, seed=0):
    """Token ids: n_before text tokens, one image span, n_after text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = processor.vision_ids
    span = [ids.start] + [ids.pad] * processor.num_image_tokens + [ids.end]
    before = torch.randint(0, 600, (n_before,), generator=g).tolist()
    after = torch.randint(0, 600, (n_after,), generator=g).tolist()
    return torch.tensor([before + span + after]), n_before


def test_text_only_logits_equal_qwen3(vlm, tiny_models):
    qwen = Qwen3ForCausalLM.from_pretrained(tiny_models / "llm").eval()
    ids = torch.randint(0, 600, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row too
    with torch.no_grad():
        ours = vlm(input_ids=ids, attention_mask=mask).logits
        ref = qwen(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5


def test_chat_without_image_matches_hf_generate(tiny_models, capsys):
    from crossvlm.cli import main

    prompt = "what colour is the circle?"
    assert main(["chat", "--llm", str(tiny_models / "llm"), "--vision", str(tiny_models / "vision"),
                 "--prompt", prompt, "--greedy", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out.strip()

    tok = AutoTokenizer.from_pretrained(tiny_models / "llm")
    qwen = Qwen3ForCausalLM.from_pretrained(tiny_models / "llm").eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     enable_thinking=False, return_tensors="pt", return_dict=True)
    out = qwen.generate(**inputs, max_new_tokens=12, do_sample=False)
    ref = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ref, "the tiny random LLM should produce visible text for this comparison to mean anything"
    assert ours == ref


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_llm_with_missing_or_extra_key_fails_listing_it(tiny_models, tmp_path, change):
    bad = tmp_path / "llm"
    shutil.copytree(tiny_models / "llm", bad)
    weights = load_file(bad / "model.safetensors")
    if change == "missing":
        key = "model.layers.1.mlp.up_proj.weight"
        del weights[key]
    else:
        key = "model.layers.0.extra_adapter.weight"
        weights[key] = torch.zeros(2, 2)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        CrossVLM.from_base_models(bad, tiny_models / "vision")
    assert key in str(err.value)
    assert ("missing" if change == "missing" else "unexpected") in str(err.value)


def test_vision_tower_loads_from_a_full_clip_checkpoint(tiny_models, tmp_path):
    # openai/clip-vit-base-patch16 is a CLIPModel checkpoint (vision + text towers).
    tower = load_vision(tiny_models / "vision")
    clip = CLIPModel(CLIPConfig(vision_config=tower.config.to_dict(),
                                text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=100)))
    # (transformers versions differ on whether CLIPVisionModel's keys carry "vision_model.")
    clip.vision_model.load_state_dict({k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()})
    clip.save_pretrained(tmp_path / "clip")
    loaded = load_vision(tmp_path / "clip")
    pix = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pix).last_hidden_state, tower(pix).last_hidden_state)


def test_image_changes_logits_after_its_span_only(vlm, processor):
    ids, start = _image_prompt(processor)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 3, 64, 64, generator=g), torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        la = vlm(input_ids=ids, pixel_values=a).logits
        lb = vlm(input_ids=ids, pixel_values=b).logits
    assert torch.equal(la[:, :start + 1], lb[:, :start + 1])  # text and <|vision_start|> before the image
    assert (la[:, start + 1:] - lb[:, start + 1:]).abs().amax(-1).min() > 1e-6  # every later position


def test_wrong_number_of_image_pads_raises(vlm, processor):
    ids, _ = _image_prompt(processor)
    pix = torch.randn(1, 3, 64, 64)
    with pytest.raises(ImageTokenMismatch, match="sample 0 has 15"):
        vlm(input_ids=ids[:, torch.arange(ids.shape[1]) != 5], pixel_values=pix)
    with pytest.raises(ImageTokenMismatch, match="1 image spans .* but 2 images"):
        vlm(input_ids=ids, pixel_values=pix.repeat(2, 1, 1, 1))
    with pytest.raises(ImageTokenMismatch, match="but 0 images"):
        vlm(input_ids=ids)


def test_save_then_load_gives_identical_outputs(vlm, processor, tmp_path):
    ids, _ = _image_prompt(processor)
    pix = torch.randn(1, 3, 64, 64)
    vlm.save_pretrained(tmp_path)
    again = CrossVLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(vlm(input_ids=ids, pixel_values=pix).logits, again(input_ids=ids, pixel_values=pix).logits)
    assert again.llm.generation_config.eos_token_id == vlm.llm.generation_config.eos_token_id


def test_saved_model_with_wrong_key_fails(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["projector.queries"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="projector.queries"):
        CrossVLM.from_pretrained(tmp_path)


def test_greedy_generation_with_kv_cache_equals_without(vlm, processor):
    text = processor.render([{"role": "user", "content": "<image>where is the red circle?"}])
    ids = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pix = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    out = vlm.generate(ids, pix, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                       eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    cached = out.sequences[0, ids.shape[1]:]
    seq = ids
    with torch.no_grad():  # reference: no cache, the full sequence (image included) every step
        for step in range(10):
            logits = vlm(input_ids=seq, pixel_values=pix).logits[:, -1]
            # the cached path saw the same distribution at every step, not just the same argmax
            assert (out.scores[step] - logits).abs().max() < 1e-4, f"step {step}"
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == seq[0, ids.shape[1]:].tolist()


def test_projector_queries_are_distinct_at_init(vlm):
    # Identical inputs for every image position: only the queries' own codes can tell them apart.
    features = torch.zeros(2, vlm.config.num_patches, vlm.config.vision_config.hidden_size)
    with torch.no_grad():
        tokens = vlm.projector(features)  # (2, M, D)
    dists = torch.cdist(tokens[0], tokens[0])
    off_diag = dists[~torch.eye(len(dists), dtype=torch.bool)]
    assert off_diag.min() > 0.1 * tokens[0].norm(dim=-1).mean()


def test_queries_start_out_looking_at_their_own_region():
    proj = CrossAttentionProjector(vision_dim=64, llm_dim=32, num_patches=64, num_queries=16, num_heads=4)
    attn = proj.query_attention(torch.randn(1, 64, 64))[0]  # (M=16, P=64)
    # Query (i, j) covers patches (2i..2i+1, 2j..2j+1) of the 8x8 grid.
    for qi in range(4):
        for qj in range(4):
            own = [(2 * qi + a) * 8 + 2 * qj + b for a in (0, 1) for b in (0, 1)]
            row = attn[qi * 4 + qj]
            assert row[own].sum() > 4 * (4 / 64), "own region gets far more than its uniform share"
            assert row.argmax().item() in own


# 8x8 patches under a 3x3 query grid: patch centres 0.5..7.5 times 3/8, floored, give each row's cell.
CELL_OF_ROW = [0, 0, 0, 1, 1, 2, 2, 2]
CELL_OF_PATCH = [CELL_OF_ROW[y] * 3 + CELL_OF_ROW[x] for y in range(8) for x in range(8)]


def test_cell_locality_sees_only_its_own_cell():
    """8x8 patches under a 3x3 query grid: a patch belongs to the cell its centre lies in."""
    proj = CrossAttentionProjector(vision_dim=64, llm_dim=32, num_patches=64, num_queries=9, num_heads=4,
                                   locality="cell")
    assert proj.locality is None  # a fixed mask: nothing to learn, nothing saved
    features = torch.randn(2, 64, 64)
    attn = proj.query_attention(features)  # (2, 9, 64)
    for q in range(9):
        own = [p for p in range(64) if CELL_OF_PATCH[p] == q]
        outside = [p for p in range(64) if p not in own]
        assert attn[:, q, outside].abs().max() == 0, f"query {q} looks outside its cell"
        assert torch.allclose(attn[:, q, own].sum(-1), torch.ones(2))
    # A change outside a cell leaves that cell's token unchanged.
    changed = features.clone()
    changed[:, 63] += 5.0  # bottom-right patch: cell 8
    with torch.no_grad():
        before, after = proj(features), proj(changed)
    assert torch.equal(before[:, :8], after[:, :8]) and not torch.equal(before[:, 8], after[:, 8])


@pytest.mark.parametrize("position", ["residual", "keys"])
def test_position_codes_reach_the_tokens_only_through_the_residual(position):
    """With the same feature at every patch and the learned queries zeroed, the queries differ only by
    their position codes: in the values and residual stream ("residual") the tokens tell the cells
    apart; added only where scores are formed ("keys"), every query reads the same value."""
    torch.manual_seed(0)
    proj = CrossAttentionProjector(vision_dim=64, llm_dim=32, num_patches=64, num_queries=9, num_heads=4,
                                   position=position)
    with torch.no_grad():
        proj.queries.zero_()
        tokens = proj(torch.randn(1, 1, 64).expand(2, 64, 64))[0]  # (9, 32)
        # The codes still steer the attention: queries look at different patches.
        attn = proj.query_attention(torch.randn(1, 64, 64))[0]
    spread = torch.cdist(tokens, tokens).max() / tokens.norm(dim=-1).mean()
    assert (spread > 0.1) if position == "residual" else (spread < 1e-5), spread
    assert len(set(attn.argmax(-1).tolist())) >= 5


def test_pool_init_starts_as_an_average_of_each_cell():
    """init="pool": uniform attention over the cell, values and outputs at unit gain, MLPs off, so before
    the output layers each token is its query plus the blocks' unit-gain maps of its cell's average."""
    torch.manual_seed(0)
    proj = CrossAttentionProjector(vision_dim=64, llm_dim=32, num_patches=64, num_queries=9, num_heads=4,
                                   locality="cell", position="keys", kv_norm=False, init="pool")
    features = torch.randn(2, 64, 64)
    seen = {}
    proj.norm_out.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    own = (torch.tensor(CELL_OF_PATCH)[None, :] == torch.arange(9)[:, None]).float()  # (9, 64)
    uniform = own / own.sum(-1, keepdim=True)
    with torch.no_grad():
        proj(features)
        assert torch.allclose(proj.query_attention(features), uniform.expand(2, -1, -1), atol=1e-6)
        maps = [b.o_proj.weight @ b.kv_proj.weight[64:] for b in proj.blocks]
        expected = proj.queries + sum(uniform @ proj.kv_in(features) @ m.T for m in maps)
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    for m in maps:  # unit gain: norms are kept
        assert torch.allclose(m @ m.T, torch.eye(64), atol=1e-5)


def test_locality_kinds_and_output_scale_are_checked_config_values(tiny_models):
    from crossvlm.errors import ConfigError
    from crossvlm.model import CrossVLM
    from crossvlm.model.configuration import CrossVLMConfig

    assert CrossVLMConfig(projector_locality=True).projector_locality == "gaussian"  # older configs
    assert CrossVLMConfig(projector_locality=False).projector_locality == "none"
    with pytest.raises(ConfigError, match="projector_locality='nearby' is not one of"):
        CrossVLMConfig(projector_locality="nearby")
    # CLIPVisionConfig's defaults: 224-px images, 32-px patches
    with pytest.raises(ConfigError, match="num_queries \\(64\\) <= patches per image \\(49\\)"):
        CrossVLMConfig(projector_locality="cell", num_queries=64)
    with pytest.raises(ConfigError, match="projector_position='values' is not one of"):
        CrossVLMConfig(projector_position="values", num_queries=16)
    with pytest.raises(ConfigError, match="projector_init='xavier' is not one of"):
        CrossVLMConfig(projector_init="xavier", num_queries=16)
    with pytest.raises(ConfigError, match="projector_output_scale=0"):
        CrossVLMConfig(projector_output_scale=0, num_queries=16)

    def visual_std(scale):
        torch.manual_seed(0)
        model = CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                          projector_heads=4, projector_output_scale=scale)
        with torch.no_grad():
            return model.encode_images(torch.randn(4, 3, 64, 64)).std().item()

    assert visual_std(8.0) / visual_std(1.0) == pytest.approx(8.0, rel=1e-3)


def test_sincos_codes_are_distinct():
    codes = sincos_2d(8, 64, extent=14)
    assert codes.shape == (64, 64)
    assert torch.cdist(codes, codes).fill_diagonal_(1).min() > 0.1


def test_visual_tokens_match_embedding_scale(vlm):
    pix = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        std = vlm.encode_images(pix).std().item()
    embed_std = vlm.get_input_embeddings().weight.std().item()
    assert 0.5 < std / embed_std < 2.0


def test_mixed_text_only_and_image_batch(vlm, processor):
    ids, _ = _image_prompt(processor, seed=4)
    text = torch.randint(0, 600, (1, 9), generator=torch.Generator().manual_seed(4))
    pad = processor.tokenizer.pad_token_id
    batch = torch.full((2, ids.shape[1]), pad)
    batch[0] = ids[0]
    batch[1, : text.shape[1]] = text[0]
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[ids.shape[1]], [text.shape[1]]])).long()
    pix = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        both = vlm(input_ids=batch, attention_mask=mask, pixel_values=pix).logits
        alone_img = vlm(input_ids=ids, pixel_values=pix).logits
        alone_txt = vlm(input_ids=text).logits
    assert (both[0] - alone_img[0]).abs().max() < 1e-5
    assert (both[1, : text.shape[1]] - alone_txt[0]).abs().max() < 1e-5


def test_several_images_in_one_sample(vlm, processor):
    one, _ = _image_prompt(processor, seed=5)
    two = torch.cat([one, one[:, 3:]], dim=1)  # a second image span after the first
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = vlm(input_ids=two, pixel_values=pix).logits
        swapped = vlm(input_ids=two, pixel_values=pix.flip(0)).logits
    assert logits.shape[1] == two.shape[1]
    assert not torch.allclose(logits[:, -1], swapped[:, -1])


def test_loss_uses_only_labelled_positions(vlm, processor):
    ids, _ = _image_prompt(processor, seed=6)
    pix = torch.randn(1, 3, 64, 64)
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    with torch.no_grad():
        loss = vlm(input_ids=ids, pixel_values=pix, labels=labels)
        logits = vlm(input_ids=ids, pixel_values=pix).logits
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert loss.logits is None  # no [batch, seq, vocab] tensor in training
    assert abs(loss.loss.item() - ref.item()) < 1e-5


def test_positions_from_the_host_give_the_masks_loss_and_gradients(tiny_vlm_dir, processor):
    """`image_positions` / `label_positions` (what the trainer passes, so a GPU step has no host
    sync): the same loss and gradients as the boolean masks, two images in one row and labels
    at a row's first token and at the end of the other row."""
    model = CrossVLM.from_pretrained(tiny_vlm_dir).train()
    one, _ = _image_prompt(processor, seed=7)
    two = torch.cat([one, one[:, 3:]], dim=1)  # a row with two image spans
    text = torch.randint(0, 600, (1, two.shape[1] - one.shape[1]), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([two, torch.cat([one, text], dim=1)])  # (2, T), 3 images
    labels = torch.full_like(ids, -100)
    labels[0, :3] = ids[0, :3]  # a row's first token is nobody's target
    labels[1, -5:] = ids[1, -5:]
    pix = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))

    def loss_and_grads(**positions):
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=pix, labels=labels, **positions).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masked, masked_grads = loss_and_grads()
    indexed, indexed_grads = loss_and_grads(
        image_positions=image_positions_of(ids, model.config.image_token_id), label_positions=label_positions_of(labels))
    assert len(label_positions_of(labels)) == 2 + 5
    torch.testing.assert_close(indexed, masked)
    assert masked_grads.keys() == indexed_grads.keys() and any("projector" in n for n in masked_grads)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(indexed_grads[name], grad, msg=name)


def test_vision_tower_frozen_and_outside_autograd(vlm, processor):
    vlm.train()
    assert not vlm.vision.training and vlm.projector.training
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    feats = vlm.vision_features(torch.randn(1, 3, 64, 64))
    assert not feats.requires_grad and feats.grad_fn is None
    ids, _ = _image_prompt(processor, seed=7)
    labels = ids.clone()
    vlm(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=labels).loss.backward()
    assert vlm.projector.queries.grad is not None
    vlm.zero_grad(set_to_none=True)
    vlm.eval()


def test_mlp_projector_baseline_uses_one_token_per_patch(tiny_models):
    model = CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", projector_type="mlp")
    assert model.num_image_tokens == model.config.num_patches == 256
    with torch.no_grad():
        tokens = model.encode_images(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 256, model.config.text_config.hidden_size)


def test_processor_renders_template_and_expands_images(processor):
    msgs = [{"role": "user", "content": "<image>What colour is it?"}]
    text = processor.render(msgs)
    assert text.startswith("<|im_start|>user\n<|vision_start|>")
    assert text.count("<|image_pad|>") == processor.num_image_tokens
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert processor.render(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_to_rgb_handles_alpha_palette_and_grey():
    from PIL import Image

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("P", (4, 4))).mode == "RGB"


def test_vision_tower_is_cut_at_the_feature_layer(tiny_models, vlm, tmp_path):
    full = load_vision(tiny_models / "vision").eval()
    n = full.config.num_hidden_layers
    # Feature layer -2: the last layer and the final LayerNorm are gone, not merely skipped.
    assert len(vision_layers(vlm.vision)) == n - 1
    assert not any(k.startswith(dropped_prefixes(vlm.vision, -2)) for k in vlm.state_dict())
    assert any(k.startswith(dropped_prefixes(full, -2, prefix="")) for k in full.state_dict())
    pixels = torch.randn(2, 3, full.config.image_size, full.config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(vlm.vision_features(pixels), expected)
    # A directory saved before the cut (with the whole tower) still loads, the extra layers skipped.
    old = CrossVLM(vlm.config)
    state = {**vlm.state_dict(), **{f"vision.{k}": v for k, v in full.state_dict().items()}}
    old.load_state_dict({k: v for k, v in state.items() if k in old.state_dict()})
    save_file({k: v.contiguous() for k, v in state.items() if k != "llm.lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    vlm.config.save_pretrained(tmp_path)
    reloaded = CrossVLM.from_pretrained(tmp_path)
    assert len(vision_layers(reloaded.vision)) == n - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded.vision_features(pixels), expected)


def test_feature_layer_one_keeps_one_layer(tiny_models):
    model = CrossVLM.from_base_models(tiny_models / "llm", tiny_models / "vision", num_queries=16,
                                      projector_heads=4, vision_feature_layer=1)
    assert len(vision_layers(model.vision)) == 1
