"""The world VLM: a small LLaVA-architecture model (CLIP-style vision tower + Llama) and its processor, built
from scratch for the scene world when the user configures no base VLM.

Everything is a stock transformers class (`LlavaForConditionalGeneration`, `LlavaProcessor`,
`CLIPImageProcessor`, a `tokenizers` word-level tokenizer behind `PreTrainedTokenizerFast`), so a folder
written by `save_pretrained` loads through `AutoProcessor` / `AutoModelForImageTextToText`, exactly the path a
user's LLaVA-1.5 checkpoint takes (`trainer.model_loading.load_vlm`).

Image tokens: a 64 px image in 8 px patches gives 64 patch embeddings plus CLIP's CLS. With
`vision_feature_select_strategy="default"` LLaVA drops the CLS, so the language model sees 64 image tokens; the
processor expands the one `<image>` of a prompt to `(64 // 8) ** 2 + num_additional_image_tokens(1) - 1 = 64`
tokens (LLaVA-1.5's own convention), and the model checks that both counts agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from world import grammar, vocab
from world.scene import ObjectSpec

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4, in this order

# LLaVA-1.5's prompt format (`USER: <image>\n{prompt} ASSISTANT:`), as a chat template over content parts, so
# that `processor.apply_chat_template` works on the world VLM like on llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- for content in message['content'] if content['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for content in message['content'] if content['type'] == 'text' -%}{{ content['text'] }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{%- if not loop.last or add_generation_prompt -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# CLIP's normalisation; the images are saturated colours on dim greys, any fixed affine map works.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WorldVLMConfig:
    """Architecture of the world VLM (defaults: ~4 M parameters, 64 image tokens)."""

    image_size: int = 64
    """Input resolution; world images are rendered at this size."""
    patch_size: int = 8
    """Vision patch size: 64 px / 8 = 8x8 = 64 image tokens."""
    vision_width: int = 128
    """CLIP vision tower width."""
    vision_layers: int = 4
    """CLIP vision tower depth."""
    vision_heads: int = 4
    """CLIP vision attention heads."""
    text_width: int = 256
    """Llama hidden size."""
    text_layers: int = 4
    """Llama depth."""
    text_heads: int = 4
    """Llama attention heads (no grouped-query attention)."""
    text_intermediate: int = 768
    """Llama MLP width."""
    max_positions: int = 256
    """Longest sequence (64 image tokens + prompt + the longest caption is ~140)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width / text_width must be divisible by vision_heads / text_heads")
        if self.max_positions <= self.num_image_tokens + 8:
            raise ValueError(f"max_positions={self.max_positions} leaves no room for text after "
                             f"{self.num_image_tokens} image tokens; raise it")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------------------------- tokenizer
def library_corpus() -> list[str]:
    """Sentences that use every word the world's grammar can produce (whole `world.vocab` library, every
    template), so the tokenizer covers any world config, rejected answers and the chat format included."""
    spec = ObjectSpec("square", "red", "small", "top left")
    texts = [grammar.DESCRIBE_PROMPT, grammar.COUNT_PROMPT, "USER: ASSISTANT:", grammar.count_answer(1),
             grammar.count_answer(2), grammar.yesno_prompt(spec), grammar.yesno_answer(True, spec),
             grammar.yesno_answer(False, spec)]
    texts += [grammar.attribute_prompt(a, spec) for a in grammar.ATTRIBUTE_QUESTION]
    texts += [grammar.attribute_answer(a, spec, getattr(spec, a)) for a in grammar.ATTRIBUTE_QUESTION]
    texts += [" ".join(vocab.SHAPES), " ".join(vocab.COLOURS), " ".join(vocab.SIZES), " ".join(vocab.BACKGROUNDS),
              " ".join(vocab.NUMBER_WORDS), " ".join(vocab.POSITIONS), "a an the at on in and , . ? background"]
    return texts


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A case-sensitive word-level tokenizer (words and single punctuation marks) trained on `texts` plus the
    world's whole library vocabulary. Prepends `<s>`; decodes with spaces between words but none before
    punctuation, so a decoded answer reads like the world's text."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tok.train_from_iterator([*library_corpus(), *texts],
                            trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert [ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))), ids
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # cleanup: "objects ." -> "objects."
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="right", model_max_length=512,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, cfg: WorldVLMConfig) -> LlavaProcessor:
    """`LlavaProcessor` whose `<image>` expands to exactly `cfg.num_image_tokens` tokens (CLS dropped)."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # the CLS, dropped again
        chat_template=CHAT_TEMPLATE, image_token=IMAGE,
    )


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: WorldVLMConfig, tokenizer: PreTrainedTokenizerFast,
                seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised `LlavaForConditionalGeneration` (seeded), fp32, with generation defaults set."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=cfg.num_image_tokens,
        # -1: the last layer of the tower (LLaVA's default -2 would leave a 4-layer tower's top layer unused).
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    gen.do_sample, gen.max_new_tokens = False, 64
    return model


def unused_parameters(model: LlavaForConditionalGeneration) -> list[str]:
    """Parameters no loss can reach: CLIP's `post_layernorm` only feeds the pooled CLS output, which LLaVA
    never reads. Freeze them, or a check that "every trainable parameter changed" fails on them."""
    return [n for n, _ in model.named_parameters() if ".post_layernorm." in n and "vision_tower" in n]


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
