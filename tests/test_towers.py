"""Vision towers other than CLIP: SigLIP (a vision-only directory) and SigLIP 2 (a full image-text
SiglipModel checkpoint, as google/siglip2-base-patch16-224 ships), each loaded, cut, trained,
saved, reloaded and chatted with through the same code as CLIP (which runs here too)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crossvlm.cli import main
from crossvlm.configs import config_path
from crossvlm.errors import ModelLoadError
from crossvlm.inference import ChatModel, SamplingParams
from crossvlm.make_model import TOWERS, write_random_models
from crossvlm.model import CrossVLM
from crossvlm.model.modeling import load_vision
from crossvlm.model.processor import CrossVLMProcessor
from crossvlm.model.vision import vision_layers
from crossvlm.train.config import load_config
from serving import shapes_image

CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "SiglipVisionModel"}
# What config.json says for each: google/siglip2-*-224 checkpoints are SiglipModel ("siglip").
MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip"}


@pytest.fixture(scope="module", params=TOWERS)
def base(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"base_{request.param}")
    write_random_models(out, "tiny", seed=0, tower=request.param)
    return request.param, out


def _build(base_dir: Path, **kwargs) -> CrossVLM:
    torch.manual_seed(0)
    return CrossVLM.from_base_models(base_dir / "llm", base_dir / "vision", num_queries=16, projector_heads=4,
                                     **kwargs)


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_tower_class_comes_from_the_directory_config(base):
    tower, base_dir = base
    assert json.loads((base_dir / "vision" / "config.json").read_text())["model_type"] == MODEL_TYPES[tower]
    vision = load_vision(base_dir / "vision")
    assert type(vision).__name__ == CLASSES[tower]
    model = _build(base_dir)
    assert type(model.vision).__name__ == CLASSES[tower]
    # CLIP's sequence starts with a CLS token, dropped; SigLIP has none: 16×16 patches reach the projector.
    features = model.vision_features(_pixels())
    assert features.shape == (2, 256, 64) == (2, model.config.num_patches, 64)
    # Frozen by default: eval mode, no gradients, and no autograd graph through it even in training.
    assert not model.train().vision.training and not any(p.requires_grad for p in model.vision.parameters())
    assert features.grad_fn is None and model.vision_features(_pixels()).grad_fn is None


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_strict_loading_lists_missing_and_extra_keys(base, tmp_path, change):
    tower, base_dir = base
    bad = tmp_path / "vision"
    shutil.copytree(base_dir / "vision", bad)
    weights = load_file(bad / "model.safetensors")
    inner = "vision_model." if tower == "siglip2" else ""  # a SiglipModel keeps the tower under vision_model
    prefix = next(k for k in weights if k.startswith(f"{inner}encoder.layers.1.")).rsplit("encoder.", 1)[0]
    key = f"{prefix}encoder.layers.1.mlp.fc1.weight" if change == "missing" else f"{prefix}encoder.extra.weight"
    if change == "missing":
        del weights[key]
    else:
        weights[key] = torch.zeros(2, 2)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_vision(bad)
    message = str(err.value)
    assert ("missing keys (1)" if change == "missing" else "unexpected keys (1)") in message
    assert key.removeprefix("vision_model.") in message
    assert "text_model" not in message  # the text tower of a full checkpoint is expected to go unused


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_cut_tower_gives_the_uncut_towers_features(base, feature_layer):
    tower, base_dir = base
    full = load_vision(base_dir / "vision").eval()
    model = _build(base_dir, vision_feature_layer=feature_layer)
    keys = list(model.state_dict())
    assert not any(k.startswith("vision.head.") for k in keys)  # SigLIP's pooling head is gone
    assert len(vision_layers(model.vision)) == 2 + 1 + feature_layer
    with torch.no_grad():
        out = full(pixel_values=_pixels(), output_hidden_states=True)
        # The last layer: the tower's own last_hidden_state (SigLIP's includes its final LayerNorm);
        # an earlier layer: that hidden state, untouched by the final LayerNorm.
        expected = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
        expected = expected[:, 1:] if tower == "clip" else expected
        torch.testing.assert_close(model.vision_features(_pixels()), expected)
    has_norm = any(k.startswith("vision.post_layernorm.") for k in keys)
    assert has_norm == (tower != "clip" and feature_layer == -1)


def test_trainable_tower_gets_a_gradient_for_every_parameter(base):
    _, base_dir = base
    model = _build(base_dir, freeze_vision=False, vision_feature_layer=-1).train()
    processor = CrossVLMProcessor.from_base_models(base_dir / "llm", base_dir / "vision", model.num_image_tokens)
    batch = processor([processor.render([{"role": "user", "content": "<image>what?"}])], [shapes_image(0)])
    labels = batch["input_ids"].clone()
    model(**batch, labels=labels).loss.backward()
    no_grad = [n for n, p in model.vision.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.slow
def test_training_run_saves_a_directory_that_reloads_and_chats(base, tmp_path, capsys):
    from crossvlm.data.synth import write_synthetic
    from crossvlm.train.loop import train

    tower, base_dir = base
    data = write_synthetic(tmp_path / "shapes", seed=0, n_train=8, n_test=1)["sft_train"]
    cfg = load_config(config_path("debug.yaml"), {
        "model.llm": str(base_dir / "llm"), "model.vision": str(base_dir / "vision"),
        "data.sources": [str(data)], "run.out_dir": str(tmp_path / "run"), "run.max_steps": 2,
        "trainable.vision": True})
    out = train(cfg)
    # The directory alone describes the tower: its kind, its (cut) weights, its image processor.
    saved = json.loads((out / "config.json").read_text())["vision_config"]
    assert saved["model_type"] == ("clip_vision_model" if tower == "clip" else "siglip_vision_model")
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"].startswith(
        "CLIPImageProcessor" if tower == "clip" else "SiglipImageProcessor")
    trained = CrossVLM.from_pretrained(out).eval()
    before = load_vision(base_dir / "vision").state_dict()
    after = {k.removeprefix("vision."): v for k, v in trained.state_dict().items() if k.startswith("vision.")}
    assert any(not torch.equal(v, before[k]) for k, v in after.items())  # the tower trained

    # Save / load: identical outputs.
    processor = CrossVLMProcessor.from_pretrained(out)
    batch = processor([processor.render([{"role": "user", "content": "<image>what colour?"}])], [shapes_image(2)])
    again = tmp_path / "again"
    trained.save_pretrained(again)
    processor.save_pretrained(again)
    reloaded = CrossVLM.from_pretrained(again).eval()
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, reloaded(**batch).logits)
    assert torch.equal(CrossVLMProcessor.from_pretrained(again)(["x"], [shapes_image(2)])["pixel_values"],
                       batch["pixel_values"])

    # `crossvlm chat` through the CLI answers what the Python API answers.
    image = tmp_path / "shapes.png"
    shapes_image(3).save(image)
    capsys.readouterr()  # the training run's report
    assert main(["chat", "--model", str(again), "--image", str(image), "--prompt", "count the shapes",
                 "--greedy", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    chat = ChatModel.load(again, device="cpu")
    expected = chat.chat([{"role": "user", "content": "<image>count the shapes"}], [shapes_image(3)],
                         SamplingParams(max_new_tokens=8, greedy=True)).text
    assert capsys.readouterr().out == expected + "\n"


def test_siglip2_naflex_and_unknown_towers_are_refused(tmp_path):
    naflex = tmp_path / "naflex"
    naflex.mkdir()
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2", "vision_config": {}}))
    with pytest.raises(ModelLoadError, match="NaFlex.*google/siglip2-base-patch16-224"):
        load_vision(naflex)
    other = tmp_path / "dino"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ModelLoadError, match="'dinov2'.*CLIP and SigLIP"):
        load_vision(other)


def test_make_model_command_writes_the_chosen_tower(tmp_path, capsys):
    assert main(["make-model", "--out", str(tmp_path), "--vision-tower", "siglip2"]) == 0
    assert json.loads((tmp_path / "vision" / "config.json").read_text())["model_type"] == "siglip"
    assert type(load_vision(tmp_path / "vision")).__name__ == "SiglipVisionModel"
