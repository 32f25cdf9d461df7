"""The default base model (world VLM + SFT) and the model-loading helpers the trainer builds on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from world.base_model import BASE_PRESETS, BaseModelConfig, build_world_vlm, caption_scores, main, \
    sft_rows, sft_steps, train_base_model, load_images
from trainer.model_loading import IGNORE_INDEX, encode_batch, format_prompt, greedy_generate, load_vlm, \
    response_logps, response_logps_from_model
from world.vlm import IMAGE, unused_parameters
from world import PROMPT_KINDS, grammar
from world.generate import read_scenes

TINY = BASE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_base(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    return train_base_model(tiny_world, out, TINY, progress=False)


@pytest.fixture(scope="module")
def fresh(tiny_world):
    """A random-init tiny world VLM, its processor and a few training rows with their images."""
    model, processor = build_world_vlm(tiny_world, TINY)
    qa, caps = sft_rows(tiny_world)
    rows = qa.rows()[:3] + caps.rows()[:2]
    images = load_images(tiny_world, [r[0] for r in rows])
    return model, processor, rows, [images[r[0]] for r in rows]


def _encode(processor, rows, images, **kw):
    return encode_batch(processor, images, [r[1] for r in rows], [r[2] for r in rows], **kw)


def test_saved_folder_loads_back_with_identical_logits(fresh, tmp_path):
    model, processor, rows, images = fresh
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = load_vlm(tmp_path, dtype="float32")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and type(proc2).__name__ == "LlavaProcessor"
    a, b = _encode(processor, rows, images), _encode(proc2, rows, images)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.extras["pixel_values"], b.extras["pixel_values"])
    with torch.no_grad():
        want = model.eval()(**a.model_inputs()).logits
        got = loaded(**b.model_inputs()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_image_tokens_equal_patches_and_labels_cover_only_the_answer(fresh):
    model, processor, rows, images = fresh
    n_patches = (TINY.arch.image_size // TINY.arch.patch_size) ** 2
    assert n_patches == TINY.arch.num_image_tokens == model.config.image_seq_length == 64
    prompt = format_prompt(processor, rows[0][1])
    assert prompt == f"USER: {IMAGE}\n{rows[0][1]} ASSISTANT:"
    assert prompt.count(IMAGE) == 1  # the processor expands it
    batch = _encode(processor, rows, images)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert (batch.input_ids == image_id).sum(1).tolist() == [n_patches] * len(rows)
    tok = processor.tokenizer
    for i, (start, end) in enumerate(batch.spans):
        answer_ids = tok(rows[i][2], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert batch.labels[i, start:end].tolist() == answer_ids
        assert (batch.labels[i, :start] == IGNORE_INDEX).all() and (batch.labels[i, end:] == IGNORE_INDEX).all()
        assert tok.decode(batch.labels[i, start:end - 1]) == rows[i][2]  # the word-level tokenizer round-trips
        assert batch.attention_mask[i].sum() == end  # right padding after the answer
    # The model agrees with the processor's count (it raises when image tokens and features differ).
    with torch.no_grad():
        model(**batch.model_inputs())


def test_response_logps_equal_the_sum_by_hand(fresh):
    model, processor, rows, images = fresh
    batch = _encode(processor, rows, images)
    with torch.no_grad():
        logits = model.eval()(**batch.model_inputs()).logits
        got = response_logps(logits, batch.labels)
        kept = response_logps_from_model(model, batch)  # logits_to_keep path
    logp = torch.log_softmax(logits.double(), -1)
    want = [sum(logp[i, t - 1, batch.input_ids[i, t]].item() for t in range(s, e))
            for i, (s, e) in enumerate(batch.spans)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kept, got, rtol=1e-5, atol=1e-4)


def test_truncation_never_cuts_image_tokens(fresh):
    model, processor, rows, images = fresh
    with pytest.raises(ValueError, match=r"example 'ex-42': max_length=40 would cut image tokens"):
        _encode(processor, rows[:1], images[:1], max_length=40, example_ids=["ex-42"])
    n_prompt = _encode(processor, rows[:1], images[:1]).spans[0][0]
    with pytest.raises(ValueError, match=r"example 'ex-42': max_length=.* no room for the response"):
        _encode(processor, rows[:1], images[:1], max_length=n_prompt, example_ids=["ex-42"])
    cut = _encode(processor, rows[:1], images[:1], max_length=n_prompt + 2)
    assert cut.truncated == [True] and cut.spans == [(n_prompt, n_prompt + 2)]


def test_sft_steps_lower_the_loss_and_change_every_trainable_parameter(tiny_world):
    model, processor = build_world_vlm(tiny_world, TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = sft_steps(model, processor, tiny_world, TINY, steps=10, progress=False)
    assert np.mean(losses[-3:]) < losses[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(unused_parameters(model)) == {n for n, p in model.named_parameters() if not p.requires_grad}
    unchanged = [n for n in trainable if torch.equal(before[n], model.get_parameter(n))]
    assert not unchanged and len(trainable) == len(before) - 2  # all but post_layernorm (weight, bias)


def test_sft_is_deterministic_under_a_seed(tiny_world):
    runs = []
    for _ in range(2):
        model, processor = build_world_vlm(tiny_world, TINY)
        losses = sft_steps(model, processor, tiny_world, TINY, steps=3, progress=False)
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_decoding_is_deterministic(fresh, tiny_world):
    model, processor, rows, images = fresh
    model.eval()
    prompts = [r[1] for r in rows]
    first = greedy_generate(model, processor, images, prompts, max_new_tokens=6, batch_size=len(rows))
    again = greedy_generate(model, processor, images, prompts, max_new_tokens=6, batch_size=len(rows))
    assert first == again and len(first) == len(rows) and all(isinstance(a, str) for a in first)
    assert processor.tokenizer.padding_side == "right"  # restored after left-padded generation


def test_report_has_per_kind_accuracies_and_is_reused(tiny_base, tiny_world):
    folder = tiny_base.folder
    report = json.loads((Path(folder) / "base_report.json").read_text())
    assert report["trained"] and set(report["accuracy_by_kind"]) <= set(PROMPT_KINDS)
    assert "describe" in report["accuracy_by_kind"]
    assert all(0 <= v <= 1 for v in report["accuracy_by_kind"].values())
    cap = report["caption"]
    for key in ("exact_match", "count", "colour", "size", "position", "shape", "background", "well_formed"):
        assert 0 <= cap[key] <= 1, key
    assert report["config"] == TINY.to_dict() and len(report["losses"]) == TINY.steps
    again = train_base_model(tiny_world, folder, TINY, progress=False)
    assert not again.trained and again.accuracy_by_kind == tiny_base.accuracy_by_kind
    # The CLI takes the same path (reuses the folder) and the folder loads through load_vlm.
    assert not main(["--world", str(tiny_world), "--out", folder, "--preset", "tiny"]).trained
    model, processor = load_vlm(folder)
    assert model.config.vision_feature_layer == -1 and processor.patch_size == TINY.arch.patch_size


def test_base_config_rejects_nonsense():
    with pytest.raises(ValueError, match="qa_fraction"):
        BaseModelConfig(qa_fraction=1.5)
    with pytest.raises(ValueError, match="max_length"):
        BaseModelConfig(max_length=64)


def test_caption_scores_find_the_wrong_attribute(tiny_world):
    scene = next(iter(read_scenes(tiny_world, "test").values()))
    truth = grammar.caption(scene)
    assert all(v == 1.0 for k, v in caption_scores(scene, truth).items() if k != "mention_error_rate")
    assert caption_scores(scene, truth)["mention_error_rate"] == 0.0
    first = scene.objects[0]
    other = next(s for s in ("circle", "square", "triangle") if s != first.shape)
    swapped = truth.replace(f"{first.colour} {first.shape}", f"{first.colour} {other}", 1)
    scores = caption_scores(scene, swapped)
    assert scores["shape"] == pytest.approx(1 - 1 / len(scene.objects))
    assert scores["colour"] == scores["size"] == scores["count"] == scores["position"] == 1.0
    assert scores["mention_error_rate"] == pytest.approx(1 / len(scene.objects))
    same_size = [o for o in scene.objects if o.size == first.size]
    assert scores[f"shape_{first.size}"] == pytest.approx(1 - 1 / len(same_size))


def test_load_vlm_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vlm(tmp_path / "empty")
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="not a vision-language model"):
        load_vlm(tmp_path / "llm")
    cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_x.XForVision"}
    (tmp_path / "llm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_vlm(tmp_path / "llm")
    with pytest.raises(ValueError, match="dtype"):
        load_vlm(tmp_path / "llm", dtype="fp8")


def _tiny_qwen2_vl(folder):
    """A random tiny Qwen2-VL with a byte-level BPE tokenizer and Qwen's chat format, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, \
        Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Describe the image. a large red circle on the left. You are a helpful assistant."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    template = (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=64 * 64 * 4, patch_size=14,
                                              merge_size=2),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_qwen2_vl_goes_through_the_same_path(tmp_path):
    _tiny_qwen2_vl(tmp_path)
    model, processor = load_vlm(tmp_path)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert format_prompt(processor, "Describe the image.").endswith(
        "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n<|im_start|>assistant\n")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    batch = encode_batch(processor, images, ["Describe the image.", "Describe it."],
                         ["a large red circle on the left", "a red circle"])
    # 64 px -> 56 px -> 4x4 patches of 14 px -> 2x2 merged = 4 image tokens per image.
    assert (batch.input_ids == processor.image_token_id).sum(1).tolist() == [4, 4]
    assert batch.extras["mm_token_type_ids"].shape == batch.input_ids.shape
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        kept = response_logps_from_model(model, batch)
    logp = torch.log_softmax(logits.double(), -1)
    want = [sum(logp[i, t - 1, batch.input_ids[i, t]].item() for t in range(s, e))
            for i, (s, e) in enumerate(batch.spans)]
    torch.testing.assert_close(response_logps(logits, batch.labels).double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kept, response_logps(logits, batch.labels), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="'q-1': max_length=20 would cut image tokens"):
        encode_batch(processor, images[:1], ["Describe the image."], ["a"], max_length=20, example_ids=["q-1"])
    assert len(greedy_generate(model, processor, images, ["Describe the image.", "Describe it."],
                               max_new_tokens=3)) == 2
