"""Tiny random-init checkpoints of the VLM families the trainer supports, built locally (nothing downloaded).

Each builder writes a `save_pretrained` folder (model + processor) of the real Hugging Face classes with tiny
sizes, a byte-level BPE tokenizer trained here with the `tokenizers` library on a few sentences (plus the family's
special tokens), and a chat template modelled on the family's published one (PaliGemma has none: its processor's
prefix/suffix API is the format). Images of 28-56 px keep every forward in milliseconds.

    folder = build("idefics3", tmp / "idefics3")
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words the tokenizers learn: the tiny world's prompts and answers, and the chat formats' fixed text.
CORPUS = [
    "Describe the image. Is there a red circle in the image? Answer yes or no.",
    "The image shows a large red circle on the left and a small blue square. yes no",
    "You are a helpful assistant. USER: ASSISTANT: User: Assistant: system user assistant [INST] [/INST]",
    "answer en caption What is in the picture? There is a green triangle.",
]

# ----------------------------------------------------------------------------------- chat templates
# LLaVA-1.5 (llava-hf): images first, then text; the assistant turn is `ASSISTANT: {text} ` with no eos (the
# model was trained with `</s>` after the answer, which the trainer appends when a template ends a turn without an
# end-of-turn token).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# LLaVA-NeXT (llava-v1.6-mistral): `[INST] <image>\n{text} [/INST]`, the answer as ` {text}</s> `.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% endif %}{% endfor %}")
# Qwen2-VL / Qwen2.5-VL: ChatML with a default system turn.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Idefics3 (Llama 3 text): `User:<image>{text}<end_of_utterance>\nAssistant: {text}<end_of_utterance>\n`.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# SmolVLM: the same turns as Idefics3 after `<|im_start|>`.
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS3_TEMPLATE[len("<|begin_of_text|>"):]

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma")


def _tokenizer(special: list[str], *, eos: str, pad: str, bos: str | None = None, extra: dict | None = None):
    """A byte-level BPE tokenizer (GPT-2 style, `Ġ` marks a leading space) with `special` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, **kw, **(extra or {}))


def _llama(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **kw)


def _clip_vision(image_size: int) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32)


def _save(model, processor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build(family: str, folder: str | Path) -> Path:
    """Write a tiny random-init checkpoint of `family` (one of FAMILIES) into `folder`; returns the folder."""
    folder = Path(folder)
    torch.manual_seed(0)
    return {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl,
            "idefics3": _idefics3, "smolvlm": _smolvlm, "paligemma": _paligemma}[family](folder)


def _llava(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], eos="</s>", pad="<pad>", bos="<s>")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    config = LlavaConfig(vision_config=_clip_vision(28), text_config=dict(model_type="llama", **_llama(tok)),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=4)
    return _save(LlavaForConditionalGeneration(config), processor, folder)


def _llava_next(folder: Path) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, \
        LlavaNextProcessor

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], eos="</s>", pad="<pad>", bos="<s>")
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    image_proc = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                         image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", chat_template=LLAVA_NEXT_TEMPLATE,
                                   image_token="<image>", num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=_clip_vision(28),
                             text_config=dict(model_type="mistral", **_llama(tok, sliding_window=None)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=4)
    return _save(LlavaNextForConditionalGeneration(config), processor, folder)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]


def _qwen(folder: Path, v25: bool) -> Path:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = _tokenizer(QWEN_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        processor = Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok,
                                        video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                                 temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
            **special)
        return _save(Qwen2_5_VLForConditionalGeneration(config), processor, folder)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN_TEMPLATE)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2,
                                                                patch_size=14, spatial_merge_size=2,
                                                                temporal_patch_size=2), **special)
    return _save(Qwen2VLForConditionalGeneration(config), processor, folder)


def _qwen2_vl(folder: Path) -> Path:
    return _qwen(folder, v25=False)


def _qwen2_5_vl(folder: Path) -> Path:
    return _qwen(folder, v25=True)


IDEFICS_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
                   "<end_of_utterance>", "<global-img>"]


def _idefics_like(folder: Path, smol: bool) -> Path:
    # image 28 px, patch 14 -> 2x2 patches; scale_factor 1 keeps them: 4 image tokens per image.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if smol:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, \
            SmolVLMProcessor, SmolVLMVideoProcessor

        special = ["<|im_start|>" if t == "<|begin_of_text|>" else t for t in IDEFICS_SPECIAL]
        tok = _tokenizer(special, eos="<end_of_utterance>", pad="<pad>", bos="<|im_start|>")
        image_proc = SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": 28},
                                           max_image_size={"longest_edge": 28})
        processor = SmolVLMProcessor(image_processor=image_proc, tokenizer=tok,
                                     video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                                     chat_template=SMOLVLM_TEMPLATE)
        config = SmolVLMConfig(vision_config=vision, text_config=dict(model_type="llama", **_llama(tok)),
                               scale_factor=1, image_token_id=tok.convert_tokens_to_ids("<image>"))
        model = SmolVLMForConditionalGeneration(config)
    else:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, \
            Idefics3Processor

        tok = _tokenizer(IDEFICS_SPECIAL, eos="<|end_of_text|>", pad="<pad>", bos="<|begin_of_text|>")
        image_proc = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 28},
                                            max_image_size={"longest_edge": 28})
        processor = Idefics3Processor(image_processor=image_proc, tokenizer=tok, image_seq_len=4,
                                      chat_template=IDEFICS3_TEMPLATE)
        config = Idefics3Config(vision_config=vision, text_config=dict(model_type="llama", **_llama(tok)),
                                scale_factor=1, image_token_id=tok.convert_tokens_to_ids("<image>"))
        model = Idefics3ForConditionalGeneration(config)
    return _save(model, processor, folder)


def _idefics3(folder: Path) -> Path:
    return _idefics_like(folder, smol=False)


def _smolvlm(folder: Path) -> Path:
    return _idefics_like(folder, smol=True)


def _paligemma(folder: Path) -> Path:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, \
        SiglipImageProcessor

    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], eos="<eos>", pad="<pad>", bos="<bos>")
    image_proc = SiglipImageProcessor(size={"height": 28, "width": 28})
    image_proc.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)
    text = dict(model_type="gemma", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=32,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    return _save(PaliGemmaForConditionalGeneration(config), processor, folder)
