"""Load any local Hugging Face VLM folder, format its prompts, and find the response tokens in a batch.

One path for every model: `AutoProcessor` + `AutoModelForImageTextToText` (LLaVA-1.5 is the reference; the
world VLM of `trainer.world_vlm` is a small LLaVA; Qwen2-VL goes through the same calls). What a trainer needs:

    model, processor = load_vlm("data/models/base")
    batch = encode_batch(processor, images, prompts, responses, max_length=512, example_ids=ids)
    logps = response_logps_from_model(model, batch)          # (B,) sum of log p over response tokens
    answers = greedy_generate(model, processor, images, prompts)

A row is `format_prompt(prompt)` tokenised by the processor (which expands the image placeholder into the
model's image tokens), followed by the response tokenised alone and the end-of-sequence token. Prompt and
response are tokenised separately (as TRL does), so the response span is exact for any tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

IGNORE_INDEX = -100
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Used only when a processor has no chat template (LLaVA-1.5's format).
FALLBACK_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"


# ---------------------------------------------------------------------------------------------- loading
def load_vlm(path: str | Path, *, dtype: str = "auto", device: str | torch.device = "cpu",
             trust_remote_code: bool = False):
    """(model, processor) from a local `save_pretrained` folder, model in eval mode on `device`.

    `dtype`: `auto` (what the checkpoint was saved in), `float32`, `bfloat16` or `float16`.
    Raises FileNotFoundError for a missing folder, ValueError for a folder that is not a VLM or needs
    custom code while `trust_remote_code` is off."""
    folder = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"VLM folder {folder} does not exist; give a local folder written by save_pretrained (nothing is "
            "downloaded), or leave the base model unset to train the world VLM (`make base`)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    raw = json.loads(config_file.read_text())
    auto_map = raw.get("auto_map", {})
    if auto_map and not trust_remote_code:
        raise ValueError(
            f"{folder} needs custom code from the folder itself (config.json auto_map: {sorted(auto_map)}); "
            "loading it runs that code. If you trust it, turn it on: load_vlm(..., trust_remote_code=True) "
            "(trainer config: model.trust_remote_code: true)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{folder}: transformers cannot read its config (model_type "
                         f"{raw.get('model_type')!r}): {err}") from err
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES \
            and "AutoModelForImageTextToText" not in auto_map:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, which is not a vision-language model "
            "(AutoModelForImageTextToText does not know it); give a VLM folder such as llava-1.5-7b-hf")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(f"{folder}: the processor ({type(processor).__name__}) has no image processor and "
                         "tokenizer; save the model's full processor (processor.save_pretrained) in the folder")
    model = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------- prompts
def image_token_of(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def image_token_id_of(processor) -> int:
    tid = getattr(processor, "image_token_id", None)
    return int(tid) if tid is not None else int(processor.tokenizer.convert_tokens_to_ids(image_token_of(processor)))


def format_prompt(processor, prompt: str) -> str:
    """The chat-formatted text of a one-image user turn, ready for the assistant's answer.

    With a chat template: `apply_chat_template` on [image part, text part] with the generation prompt
    (world VLM / LLaVA-1.5: `USER: <image>\\n{prompt} ASSISTANT:`). Without one: that LLaVA-1.5 format.
    An image placeholder already in `prompt` (LLaVA data often has `<image>\\n`) is removed: the image goes
    where the model's format puts it, once."""
    text = prompt.replace(image_token_of(processor), "").strip()
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return FALLBACK_TEMPLATE.format(image=image_token_of(processor), prompt=text)


# ---------------------------------------------------------------------------------------------- batches
class EncodedBatch(NamedTuple):
    input_ids: torch.Tensor
    """(B, T) long, right-padded."""
    attention_mask: torch.Tensor
    """(B, T) long, 1 on real tokens."""
    labels: torch.Tensor
    """(B, T) long: the token id on response tokens (end-of-sequence included), -100 elsewhere."""
    spans: list[tuple[int, int]]
    """Per row, [start, end) of the response tokens in `input_ids` (empty when no responses were given)."""
    truncated: list[bool]
    """Per row, True when `max_length` cut the end of the response."""
    extras: dict[str, torch.Tensor]
    """The processor's other outputs (`pixel_values`, `image_sizes`, `image_grid_thw`, ...)."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extras}

    def to(self, device: str | torch.device) -> EncodedBatch:
        return self._replace(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                             labels=self.labels.to(device),
                             extras={k: v.to(device) for k, v in self.extras.items()})


def encode_batch(processor, images: Sequence[Image.Image], prompts: Sequence[str],
                 responses: Sequence[str] | None = None, *, max_length: int | None = None,
                 example_ids: Sequence[str] | None = None, add_eos: bool = True) -> EncodedBatch:
    """Rows `format_prompt(prompt) + response + eos` with one image each, right-padded, with response labels.

    Rows of one example (the response with the positive and each negative image) are just rows here, so a
    caller groups them into one batch. With `max_length`, a too-long row keeps its prompt whole and loses the
    end of its response; a row whose prompt (image tokens included) leaves no room for one response token
    raises ValueError naming the example: truncation must never cut image tokens."""
    n = len(prompts)
    if len(images) != n or (responses is not None and len(responses) != n):
        raise ValueError(f"got {len(images)} images, {n} prompts, "
                         f"{None if responses is None else len(responses)} responses; one of each per row")
    ids = list(example_ids) if example_ids is not None else [f"row {i}" for i in range(n)]
    tok = processor.tokenizer
    texts = [format_prompt(processor, p) for p in prompts]
    # The processor expands each image placeholder to the model's image tokens; rows are recovered from the
    # attention mask, so the tokenizer's padding side does not matter.
    enc = dict(processor(images=list(images), text=texts, return_tensors="pt", padding=True))
    prompt_ids_padded, prompt_mask = enc.pop("input_ids"), enc.pop("attention_mask")
    padded_len = prompt_ids_padded.shape[1]
    # Per-token side outputs (Qwen2-VL's `mm_token_type_ids`: 0 text, 1 image) follow their row; response
    # tokens are text, so they are extended with 0. Anything else per-token is refused, not misaligned.
    per_token = {k: enc.pop(k) for k in list(enc) if torch.is_tensor(enc[k]) and k != "pixel_values"
                 and enc[k].shape[:2] == (n, padded_len)}
    odd = [k for k, v in per_token.items() if v.ndim != 2 or v.is_floating_point()]
    if odd:
        raise ValueError(f"the processor returned per-token inputs {odd} that encode_batch cannot extend over "
                         "the response; add support for them in trainer.model_loading")
    if responses is None:
        response_ids = [[] for _ in range(n)]
    else:
        response_ids = tok(list(responses), add_special_tokens=False)["input_ids"]
        if add_eos:
            if tok.eos_token_id is None:
                raise ValueError("the tokenizer has no eos token; pass add_eos=False or set tokenizer.eos_token")
            response_ids = [r + [tok.eos_token_id] for r in response_ids]
    image_id = image_token_id_of(processor)
    rows, spans, truncated = [], [], []
    for i in range(n):
        prompt = prompt_ids_padded[i][prompt_mask[i].bool()].tolist()
        resp = response_ids[i]
        cut = False
        if max_length is not None and len(prompt) + len(resp) > max_length:
            need = len(prompt) + len(resp)
            image_pos = [j for j, t in enumerate(prompt) if t == image_id]
            if image_pos and image_pos[-1] >= max_length:
                raise ValueError(
                    f"example {ids[i]!r}: max_length={max_length} would cut image tokens (the prompt has "
                    f"{len(image_pos)} image tokens ending at position {image_pos[-1]}, {len(prompt)} prompt "
                    f"tokens in all); raise max_length to at least {need}")
            if len(prompt) + bool(resp) > max_length:  # prompts are never cut, and a response keeps a token
                raise ValueError(
                    f"example {ids[i]!r}: max_length={max_length} leaves no room for the response after its "
                    f"{len(prompt)} prompt tokens; raise max_length to at least {need}")
            resp, cut = resp[:max_length - len(prompt)], True
        spans.append((len(prompt), len(prompt) + len(resp)))
        rows.append(prompt + resp)
        truncated.append(cut)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(r) for r in rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    extras = {k: torch.zeros((n, width), dtype=v.dtype) for k, v in per_token.items()}
    for i, (row, (s, e)) in enumerate(zip(rows, spans)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        labels[i, s:e] = input_ids[i, s:e]
        for k, v in per_token.items():
            extras[k][i, :s] = v[i][prompt_mask[i].bool()]
    return EncodedBatch(input_ids, attention_mask, labels, spans if responses is not None else [],
                        truncated, {**enc, **extras})


# ---------------------------------------------------------------------------------------------- log-probs
def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum over response tokens of log p(token | everything before it).

    `logits` (B, T, V) are the model's outputs for `input_ids` (B, T) and `labels` (B, T) are
    `EncodedBatch.labels` (-100 off the response). Token t is predicted by the logits at t-1. Computed in
    float32 as logit[label] - logsumexp(logits), which needs no (B, T, V) log-softmax copy."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    lg, lb = logits[:, :-1], labels[:, 1:]
    mask = lb != IGNORE_INDEX
    safe = lb.masked_fill(~mask, 0)
    picked = lg.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    token_logps = picked - torch.logsumexp(lg.float(), dim=-1)
    return (token_logps * mask).sum(-1)


def response_logps_from_model(model, batch: EncodedBatch) -> torch.Tensor:
    """(B,) response log-probs of `batch` under `model` (gradients flow when enabled). Only the logits from
    the first response token on are computed (`logits_to_keep`): the image and prompt positions need none."""
    if not batch.spans:
        raise ValueError("the batch has no responses; encode it with responses=...")
    first = min(s for s, _ in batch.spans)
    width = batch.input_ids.shape[1]
    keep = width - first + 1  # logits at positions first-1 .. T-1
    out = model(**batch.model_inputs(), logits_to_keep=keep, use_cache=False)
    return response_logps(out.logits, batch.labels[:, first - 1:])


# ---------------------------------------------------------------------------------------------- decoding
@torch.inference_mode()
def greedy_generate(model, processor, images: Sequence[Image.Image], prompts: Sequence[str], *,
                    max_new_tokens: int = 64, batch_size: int = 64) -> list[str]:
    """Greedy (deterministic) answers, batched with left padding, decoded without special tokens."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [format_prompt(processor, p) for p in prompts[i:i + batch_size]]
            enc = processor(images=list(images[i:i + batch_size]), text=texts, return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers
