"""CLIP: the world CLIP trains, saves in open_clip's local-dir layout and loads back through the encoder
that embeds everything, with identical outputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.clip_encoder import ClipEncoder, ClipSpec, checkpoint_fingerprint
from world.clip import WorldClipConfig, _normalise, load_images_uint8, retrieval_from_embeddings, \
    train_world_clip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Four classes of coloured squares: learnable in a few dozen steps."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    paths, caps = [], []
    for i in range(192):
        name = list(COLOURS)[i % 4]
        img = np.full((64, 64, 3), 60, np.uint8) + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)
        x, y = rng.integers(4, 28, 2)
        img[y:y + 28, x:x + 28] = COLOURS[name]
        p = root / f"{i:03d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
        caps.append(f"a {name} square")
    return root, paths, caps


@pytest.fixture(scope="module")
def trained(squares):
    root, paths, caps = squares
    cfg = WorldClipConfig(steps=40, batch_size=32, warmup_steps=5, vision_layers=2, text_layers=2)
    return train_world_clip(paths[:160], caps[:160], paths[160:], caps[160:], root / "clip", cfg, progress=False)


def test_world_clip_learns_beyond_random_init(trained):
    assert trained.random_init_metrics.image_to_text_top1 < 0.6
    assert trained.metrics.image_to_text_top1 >= 0.9
    assert trained.metrics.text_to_image_top1 >= 0.9
    assert np.mean(trained.losses[-5:]) < np.mean(trained.losses[:5])


def test_local_dir_checkpoint_loads_with_identical_outputs(trained, squares):
    _, paths, caps = squares
    enc = ClipEncoder(ClipSpec(model=f"local-dir:{trained.folder}", device="cpu"))
    assert (trained.folder / "open_clip_model.safetensors").exists()
    emb = enc.embed_images(paths[:8], batch_size=3, progress=False)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The same weights loaded by hand, fed the training-time preprocessing, give the same vectors:
    # the encoder's open_clip preprocess must match what the model was trained on.
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.CLIP(**WorldClipConfig(vision_layers=2, text_layers=2).model_cfg())
    model.load_state_dict(load_file(trained.folder / "open_clip_model.safetensors"))
    with torch.inference_mode():
        ref = model.eval().encode_image(_normalise(load_images_uint8(paths[:8], 64, False)), normalize=True)
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-4)
    txt = enc.embed_texts(caps[:8], progress=False)
    assert retrieval_from_embeddings(emb, txt, caps[:8]).image_to_text_top1 >= 0.75


def test_fingerprint_follows_the_weights(trained, tmp_path):
    spec = ClipSpec(model=f"local-dir:{trained.folder}")
    before = checkpoint_fingerprint(spec)
    assert before == checkpoint_fingerprint(spec)
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "clip"
    shutil.copytree(trained.folder, copy)
    state = load_file(copy / "open_clip_model.safetensors")
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(copy / "open_clip_model.safetensors"))
    assert checkpoint_fingerprint(ClipSpec(model=f"local-dir:{copy}")) != before


def test_retrieval_counts_shared_captions_as_hits():
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    # image 0 retrieves caption 1, which is the same text as caption 0: a hit. Image 1 -> caption 0 likewise.
    m = retrieval_from_embeddings(img, txt, ["a", "a", "b"])
    assert m.image_to_text_top1 == 1.0
    m = retrieval_from_embeddings(img, txt, ["a", "c", "b"])
    assert m.image_to_text_top1 == pytest.approx(1 / 3)


def test_missing_or_broken_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipSpec(model=f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="empty"):
        ClipSpec(model="")
    with pytest.raises(ValueError, match="precision"):
        ClipSpec(model="ViT-B-32", precision="fp8")
    with pytest.raises(RuntimeError, match="not a known tag or valid file path"):
        ClipEncoder(ClipSpec(model="ViT-B-32", pretrained=str(tmp_path / "nope.safetensors"), device="cpu"))


def test_non_rgb_images_embed(trained, tmp_path):
    enc = ClipEncoder(ClipSpec(model=f"local-dir:{trained.folder}", device="cpu"))
    paths = []
    for mode, arr in {"L": np.full((40, 50), 100, np.uint8), "I;16": np.full((40, 50), 40000, np.uint16),
                      "RGBA": np.full((40, 50, 4), 200, np.uint8)}.items():
        p = tmp_path / f"{mode.replace(';', '')}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    paths.append(tmp_path / "p.png")
    Image.new("P", (30, 30)).save(paths[-1])
    emb = enc.embed_images(paths, progress=False)
    assert emb.shape == (4, enc.dim) and np.isfinite(emb).all()
