"""Every supported VLM family through the same code, on tiny random-init checkpoints of the real Hugging Face
classes built locally (tests/tiny_families.py; nothing downloaded): the response span is the assistant turn the
model's own chat template writes (PaliGemma: its processor's suffix), masking over the response is causal, two
`misp` steps train with and without LoRA (LoRA only inside the language model), and the evaluation generates.

The family x (train, LoRA, eval, span = template) table in docs/trainer.md is what these tests back."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eval.run import EvalConfig, evaluate_model
from tiny_families import FAMILIES, build
from trainer.config import load_config
from trainer.model_loading import encode_batch, end_of_turn_ids, format_prompt, greedy_generate, load_vlm, \
    response_logps_from_model
from trainer.train import train
from trainer.trainable import PROJECTOR_KEYS, VISION_KEYS, language_model_prefix

PROMPTS = ["Describe the image.", "<image>\nIs there a red circle in the image?"]
RESPONSES = ["The image shows a red circle.", "yes"]
# The answer tokens of RESPONSES[0] and the end-of-turn token, as each family's format writes them, by hand:
# byte-level BPE marks a leading space with `Ġ`; ChatML (Qwen) and PaliGemma's suffix start the answer with no space.
SPACED = ["ĠThe", "Ġimage", "Ġshows", "Ġa", "Ġred", "Ġcircle", "."]
BARE = ["The"] + SPACED[1:]
EXPECTED_TURN = {
    "llava": SPACED + ["</s>"],  # llava-hf's template ends the turn with a space: the model's eos is appended
    "llava_next": SPACED + ["</s>"],
    "qwen2_vl": BARE + ["<|im_end|>"],  # the "\n" after <|im_end|> is not part of the answer
    "qwen2_5_vl": BARE + ["<|im_end|>"],
    "idefics3": SPACED + ["<end_of_utterance>"],  # not the tokenizer's eos <|end_of_text|>
    "smolvlm": SPACED + ["<end_of_utterance>"],
    "paligemma": BARE + ["<eos>"],
}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def loaded(family_dirs):
    return {f: load_vlm(d) for f, d in family_dirs.items()}


def _images(n=2):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_response_span_is_the_templates_assistant_turn(family, loaded):
    model, processor = loaded[family]
    tok = processor.tokenizer
    batch = encode_batch(processor, _images(), PROMPTS, RESPONSES)
    s, e = batch.spans[0]
    assert tok.convert_ids_to_tokens(batch.input_ids[0, s:e].tolist()) == EXPECTED_TURN[family]
    assert batch.labels[0, s:e].tolist() == batch.input_ids[0, s:e].tolist()
    assert (batch.labels[0, :s] == -100).all() and (batch.labels[0, e:] == -100).all()
    s1, e1 = batch.spans[1]
    assert tok.convert_ids_to_tokens(batch.input_ids[1, s1:e1].tolist())[-1] == EXPECTED_TURN[family][-1]
    # The span's text is what the template writes after the generation prompt (up to its end-of-turn token).
    if family != "paligemma":
        head = format_prompt(processor, PROMPTS[0])
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]},
                 {"role": "assistant", "content": [{"type": "text", "text": RESPONSES[0]}]}]
        full = processor.apply_chat_template(turns, tokenize=False)
        assert full.startswith(head)
        written = tok.decode(batch.input_ids[0, s:e])
        assert full[len(head):].startswith(written) or full[len(head):].rstrip() + tok.eos_token == written
        assert processor.tokenizer.convert_ids_to_tokens(end_of_turn_ids(processor))[-1] == EXPECTED_TURN[family][-1]
    else:  # prefix bidirectional, answer causal: token_type_ids 1 exactly over the span
        types = batch.extras["token_type_ids"][0]
        assert types[s:e].eq(1).all() and types[:s].eq(0).all()
        assert "labels" not in batch.extras
    with torch.no_grad():
        logps = response_logps_from_model(model, batch)
    assert torch.isfinite(logps).all() and (logps < 0).all()


def test_a_template_that_hides_the_answer_boundary_is_refused(loaded):
    import copy

    processor = copy.deepcopy(loaded["llava"][1])
    user = "{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n{{ m['content'][1]['text'] }} "
    # The generation prompt is not how the conversation writes the assistant's turn.
    processor.chat_template = (user + "{% else %}A: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(ValueError, match="the answer cannot be located; fix the template"):
        encode_batch(processor, _images(1), PROMPTS[:1], RESPONSES[:1])
    # The generation prompt ends inside a word that the answer's turn completes: tokens merge across the boundary.
    processor.chat_template = (user + "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}"
                               "{% endfor %}{% if add_generation_prompt %}ASSIST{% endif %}")
    with pytest.raises(ValueError, match="merges the end of the prompt with the start of the answer"):
        encode_batch(processor, _images(1), PROMPTS[:1], RESPONSES[:1])


def _token_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))  # position t: log p(token t | tokens < t)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_later_response_token_leaves_earlier_log_probs(family, loaded):
    """Masking over the response is causal (PaliGemma: token_type_ids 0 there would make it bidirectional)."""
    model, processor = loaded[family]
    batch = encode_batch(processor, _images(1), PROMPTS[:1], RESPONSES[:1])
    s, e = batch.spans[0]
    changed_ids = batch.input_ids.clone()
    changed_ids[0, e - 2] = processor.tokenizer.convert_tokens_to_ids(BARE[0])  # "." -> "The"
    changed = batch._replace(input_ids=changed_ids)
    before, after = _token_logps(model, batch)[0], _token_logps(model, changed)[0]
    torch.testing.assert_close(after[s:e - 2], before[s:e - 2], rtol=0, atol=1e-9)
    assert not torch.allclose(after[e - 1], before[e - 1])  # the change is seen after it


@pytest.fixture(scope="session")
def runs(mined, family_dirs, tmp_path_factory):
    """Two `misp` steps per family with and without LoRA, through `trainer.train.train` on the tiny world's
    shards. Returns {(family, lora): (final folder, run folder)}."""
    root = mined[0]
    out = tmp_path_factory.mktemp("family-runs")
    done = {}
    for family in FAMILIES:
        for lora in (False, True):
            run = out / f"{family}-{'lora' if lora else 'full'}"
            cfg = load_config(None, [
                "--model", str(family_dirs[family]), "--data_root", str(root), "--output_dir", str(run),
                "--preset", "misp", "--max_steps", "2", "--batch_size", "2", "--warmup_steps", "1", "--lr", "1e-3",
                "--save_every", "2", "--max_length", "384", "--lora", str(lora).lower(), "--lora_r", "4"])
            done[(family, lora)] = (train(cfg, progress=False), run)
    return done


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_misp_steps_full_fine_tuning(family, runs, loaded):
    final, run = runs[(family, False)]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    # Step 1: the policy is the reference (cached by the precompute pass, over the same rows and spans): the text
    # loss is log 2 and the Plackett-Luce image loss log(1 + K), K = 3.
    assert metrics[0]["loss/text"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["loss/img"] == pytest.approx(math.log(4), abs=1e-4)
    # Checkpoints are saved with legacy key names (`language_model.model.*`): compare the loaded modules.
    before, after = dict(loaded[family][0].named_parameters()), dict(load_vlm(final)[0].named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = language_model_prefix(loaded[family][0])
    vision = {k for k in before if any(v in k for v in VISION_KEYS) and not any(p in k for p in PROJECTOR_KEYS)}
    language = {k for k in before if k.startswith(prefix + ".") and "embed_tokens" not in k}
    assert vision and not (vision & changed)  # the vision tower stays frozen
    assert language and language <= changed, sorted(language - changed)[:3]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_misp_steps_lora_adapts_only_the_language_model(family, runs, loaded):
    final, run = runs[(family, True)]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["loss/img"] == pytest.approx(math.log(4), abs=1e-4)
    adapter = load_file(str(final / "adapter_model.safetensors"))
    lora_keys = [k for k in adapter if "lora_" in k]
    prefix = language_model_prefix(loaded[family][0])
    assert lora_keys and all(f"{prefix}." in k for k in lora_keys), lora_keys[:3]
    assert not [k for k in lora_keys if any(v in k for v in VISION_KEYS + PROJECTOR_KEYS)]
    # Every linear layer of the language model is adapted (attention and MLP), none outside it.
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_keys}
    assert {"q_proj", "v_proj", "down_proj"} <= adapted


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_generates(family, runs, mined):
    final, _ = runs[(family, False)]
    world = next((mined[0] / "world").iterdir())
    cfg = EvalConfig(limit=1, settings=("random",), per_scene=1, max_new_tokens=4, max_new_tokens_yesno=2,
                     progress=False, device="cpu")
    result = evaluate_model(final, world, config=cfg)
    assert result["generations"] >= 2 and not result["problems"]
    assert result["pope"]["random"]["n"] >= 1 and result["chair"] is not None
    model, processor = load_vlm(final)
    answers = greedy_generate(model, processor, _images(), PROMPTS, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
