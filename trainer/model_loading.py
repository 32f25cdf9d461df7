"""Load any local Hugging Face VLM folder, format its prompts, and find the response tokens in a batch.

One path for every model: `AutoProcessor` + `AutoModelForImageTextToText`. Run here on tiny random-init
checkpoints of LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM and PaliGemma
(tests/test_families.py); the world VLM of `world.vlm` is a small LLaVA. What a trainer needs:

    model, processor = load_vlm("data/models/base")
    batch = encode_batch(processor, images, prompts, responses, max_length=512, example_ids=ids)
    logps = response_logps_from_model(model, batch)          # (B,) sum of log p over response tokens
    answers = greedy_generate(model, processor, images, prompts)

A row is `format_prompt(prompt)` tokenised by the processor (which expands the image placeholder into the
model's image tokens), followed by the assistant turn exactly as the model's chat template writes it: the
conversation rendered with the answer minus the prompt rendered with the generation prompt, tokenised in context
(`assistant_turn_ids`), up to and including the end-of-turn token. PaliGemma, which has no chat template, goes
through its processor's prefix/suffix API, with `token_type_ids` 1 over the answer so that it is causal.
"""

from __future__ import annotations

import json
import os
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
# Processors that read `images` as a list per sample (`[[im], [im], ...]`); a flat list would be one sample with
# every image of the batch ("number of <image> tokens ... images per sample").
NESTED_IMAGE_PROCESSORS = ("Idefics2Processor", "Idefics3Processor", "SmolVLMProcessor")
# Processors with no chat template whose format is a prefix (image tokens, bos, prompt, "\n") and a suffix (answer
# + eos), told apart by `token_type_ids`: 0 on the prefix, which the model attends bidirectionally, 1 on the
# suffix, which stays causal. The suffix is given with `processor(..., suffix=...)`.
PREFIX_SUFFIX_PROCESSORS = ("PaliGemmaProcessor",)


# ------------------------------------------------------------------------- a trained run's folder, full or LoRA
def adapter_base(model_dir: Path, base: str | os.PathLike | None) -> Path | None:
    """The local base model folder of a LoRA adapter folder (one with `adapter_config.json`, as a LoRA run's
    `final/`): `base` when given, else the adapter config's `base_model_name_or_path`. None for a full model."""
    config_file = model_dir / "adapter_config.json"
    if not config_file.is_file():
        if base is not None:
            raise ValueError(f"base={str(base)!r} is only for LoRA adapter folders, and {model_dir} has no "
                             "adapter_config.json (it is a full model folder): drop --base")
        return None
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    chosen = base if base is not None else recorded
    if not chosen:
        raise ValueError(f"{config_file} names no base model (base_model_name_or_path is empty); give the base "
                         "model folder: --base /models/llava-1.5-7b-hf")
    path = Path(chosen).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is a LoRA adapter whose base model {str(chosen)!r} is not a local model folder (nothing is "
            "downloaded); give the folder the run was trained from: --base /path/to/base (evaluate_model(base=...), load_model_or_adapter(base=...))")
    return path


def load_model_or_adapter(model_dir: str | os.PathLike, *, base: str | os.PathLike | None = None,
                          dtype: str = "auto", device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """(model, processor, base folder or None): a full model folder as `load_vlm` loads it, or a LoRA adapter folder
    on its base model, merged (generation then runs at the base model's speed). The processor is the adapter
    folder's own when the run saved one (the trainer does), else the base model's."""
    folder = Path(model_dir).expanduser()
    base_dir = adapter_base(folder, base)
    if base_dir is None:
        model, processor = load_vlm(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return model, processor, None
    from peft import PeftModel

    model, processor = load_vlm(base_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model.to(device), processor, base_dir


def image_token_of(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def image_token_id_of(processor) -> int:
    tid = getattr(processor, "image_token_id", None)
    return int(tid) if tid is not None else int(processor.tokenizer.convert_tokens_to_ids(image_token_of(processor)))


def uses_prefix_suffix(processor) -> bool:
    """True for processors whose answers go in `suffix=` (PaliGemma) rather than an assistant turn."""
    return type(processor).__name__ in PREFIX_SUFFIX_PROCESSORS


def images_argument(processor, images: Sequence[Image.Image]) -> list:
    """`images` as the processor wants them for one image per row: nested per sample for Idefics3 / SmolVLM."""
    if type(processor).__name__ in NESTED_IMAGE_PROCESSORS:
        return [[im] for im in images]
    return list(images)


def _user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _clean(processor, prompt: str) -> str:
    # An image placeholder already in `prompt` (LLaVA data often has `<image>\n`) is removed: the image goes where
    # the model's format puts it, once.
    return prompt.replace(image_token_of(processor), "").strip()


def format_prompt(processor, prompt: str) -> str:
    """The formatted text of a one-image user turn, ready for the assistant's answer.

    With a chat template: `apply_chat_template` on [image part, text part] with the generation prompt
    (world VLM / LLaVA-1.5: `USER: <image>\\n{prompt} ASSISTANT:`). PaliGemma: `<image>{prompt}` (its processor
    expands the image token and adds bos and the "\\n" that ends the prefix). Otherwise LLaVA-1.5's format."""
    text = _clean(processor, prompt)
    if uses_prefix_suffix(processor):
        return image_token_of(processor) + text
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(_user_turn(text), add_generation_prompt=True, tokenize=False)
    return FALLBACK_TEMPLATE.format(image=image_token_of(processor), prompt=text)


def _render_with_answer(processor, prompt: str, response: str) -> str:
    """The conversation of `prompt` followed by the assistant's `response`, rendered as the model's format."""
    text = _clean(processor, prompt)
    if getattr(processor, "chat_template", None):
        turns = _user_turn(text) + [{"role": "assistant", "content": [{"type": "text", "text": response}]}]
        return processor.apply_chat_template(turns, add_generation_prompt=False, tokenize=False)
    return FALLBACK_TEMPLATE.format(image=image_token_of(processor), prompt=text) + " " + response


def _special_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def _end_turn(tok, turn: list[int], special: set[int]) -> list[int]:
    """The assistant turn up to its end-of-turn token: whitespace the template writes after that token (ChatML's
    "\\n" after `<|im_end|>`, a trailing space) is not part of the answer the model generates; a template that ends
    the turn without a special token (llava-hf's LLaVA-1.5) gets the eos the model was trained to emit."""
    turn = list(turn)
    while turn and turn[-1] not in special and not tok.decode([turn[-1]]).strip():
        turn.pop()
    if not turn or turn[-1] not in special:
        if tok.eos_token_id is None:
            raise ValueError("the chat template ends the assistant turn with no special token and the tokenizer has "
                             "no eos token; set tokenizer.eos_token to the model's end-of-turn token")
        turn.append(tok.eos_token_id)
    return turn


def assistant_turn_ids(processor, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
    """Per row, the token ids of the assistant's answer and its end-of-turn token exactly as the model's format
    writes them: the conversation rendered with the answer, minus the prompt rendered with the generation prompt,
    both tokenised whole (so `ĠThe`, not the `The` of the answer tokenised alone, and `<end_of_utterance>` or
    `<|im_end|>` where the template closes the turn with them). Raises ValueError when the template does not
    render the prompt as a prefix of the conversation, or when the tokenizer merges tokens across the boundary."""
    tok = processor.tokenizer
    heads = [format_prompt(processor, p) for p in prompts]
    fulls = [_render_with_answer(processor, p, r) for p, r in zip(prompts, responses)]
    for head, full in zip(heads, fulls):
        if not full.startswith(head):
            raise ValueError(
                "the chat template renders the user turn with the generation prompt as "
                f"{head[-60:]!r}, but the conversation with an answer as {full[:len(head) + 20][-80:]!r}: the answer "
                "cannot be located; fix the template (processor.chat_template) so that a conversation starts with "
                "its prompt rendered with add_generation_prompt=True")
    encoded = tok(heads + fulls, add_special_tokens=False)["input_ids"]
    special = _special_ids(tok)
    out = []
    for head_ids, full_ids in zip(encoded[:len(heads)], encoded[len(heads):]):
        if full_ids[:len(head_ids)] != head_ids:
            n = len(head_ids)
            raise ValueError(
                "the tokenizer merges the end of the prompt with the start of the answer "
                f"({tok.convert_ids_to_tokens(head_ids[-3:])} vs {tok.convert_ids_to_tokens(full_ids[n - 3:n + 2])}); "
                "the response span would include prompt text. Use a template whose generation prompt ends at a "
                "token boundary (e.g. a trailing space or newline)")
        out.append(_end_turn(tok, full_ids[len(head_ids):], special))
    return out


def end_of_turn_ids(processor) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and the token the format closes an assistant turn with
    (Idefics3's `<end_of_utterance>` while its eos is `<|end_of_text|>`). Greedy decoding stops at either."""
    tok = processor.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if not uses_prefix_suffix(processor):
        ids.append(assistant_turn_ids(processor, ["Describe the image."], ["yes"])[0][-1])
    return list(dict.fromkeys(ids))


# ---------------------------------------------------------------------------------------------- batches
class EncodedBatch(NamedTuple):
    input_ids: torch.Tensor
    """(B, T) long, right-padded."""
    attention_mask: torch.Tensor
    """(B, T) long, 1 on real tokens."""
    labels: torch.Tensor
    """(B, T) long: the token id on response tokens (end-of-turn token included), -100 elsewhere."""
    spans: list[tuple[int, int]]
    """Per row, [start, end) of the response tokens in `input_ids` (empty when no responses were given)."""
    truncated: list[bool]
    """Per row, True when `max_length` cut the end of the response."""
    extras: dict[str, torch.Tensor]
    """The processor's other outputs (`pixel_values`, `image_sizes`, `image_grid_thw`, `token_type_ids`, ...)."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extras}

    def to(self, device: str | torch.device) -> EncodedBatch:
        return self._replace(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                             labels=self.labels.to(device),
                             extras={k: v.to(device) for k, v in self.extras.items()})


def _per_token(enc: dict, n: int, width: int) -> dict[str, torch.Tensor]:
    """Pop the processor's per-token side outputs (Qwen2-VL's `mm_token_type_ids`, PaliGemma's `token_type_ids`):
    they follow their row. Anything per-token that cannot be extended is refused, not misaligned."""
    per_token = {k: enc.pop(k) for k in list(enc) if torch.is_tensor(enc[k]) and k != "pixel_values"
                 and enc[k].shape[:2] == (n, width)}
    odd = [k for k, v in per_token.items() if v.ndim != 2 or v.is_floating_point()]
    if odd:
        raise ValueError(f"the processor returned per-token inputs {odd} that encode_batch cannot extend over "
                         "the response; add support for them in trainer.model_loading")
    return per_token


def encode_batch(processor, images: Sequence[Image.Image], prompts: Sequence[str],
                 responses: Sequence[str] | None = None, *, max_length: int | None = None,
                 example_ids: Sequence[str] | None = None) -> EncodedBatch:
    """Rows `format_prompt(prompt) + assistant turn` with one image each, right-padded, with response labels.

    The prompt is tokenised by the processor (which expands the image placeholder into the model's image tokens);
    the response tokens are the assistant turn as the model's chat template writes it (`assistant_turn_ids`), or
    for PaliGemma the processor's suffix (with `token_type_ids` 1 over it, so the answer is causal). The
    processor's own `labels` are never used. Rows of one example (the response with the positive and each negative
    image) are just rows here, so a caller groups them into one batch. With `max_length`, a too-long row keeps its
    prompt whole and loses the end of its response; a row whose prompt (image tokens included) leaves no room for
    one response token raises ValueError naming the example: truncation must never cut image tokens."""
    n = len(prompts)
    if len(images) != n or (responses is not None and len(responses) != n):
        raise ValueError(f"got {len(images)} images, {n} prompts, "
                         f"{None if responses is None else len(responses)} responses; one of each per row")
    ids = list(example_ids) if example_ids is not None else [f"row {i}" for i in range(n)]
    tok = processor.tokenizer
    texts = [format_prompt(processor, p) for p in prompts]
    suffix = responses is not None and uses_prefix_suffix(processor)
    kwargs = {"suffix": list(responses)} if suffix else {}
    # Rows are recovered from the attention mask, so the tokenizer's padding side does not matter.
    enc = dict(processor(images=images_argument(processor, images), text=texts, return_tensors="pt", padding=True,
                         **kwargs))
    enc.pop("labels", None)  # PaliGemma's, padded and over the whole suffix: ours come from the spans
    ids_padded, mask = enc.pop("input_ids"), enc.pop("attention_mask")
    per_token = _per_token(enc, n, ids_padded.shape[1])
    if suffix and "token_type_ids" not in per_token:
        raise ValueError(f"{type(processor).__name__} returned no token_type_ids with suffix=...: the answer cannot "
                         "be told from the prompt")
    turns = (assistant_turn_ids(processor, prompts, responses) if responses is not None and not suffix
             else [[] for _ in range(n)])
    image_id = image_token_id_of(processor)
    rows, row_extras, spans, truncated = [], [], [], []
    for i in range(n):
        real = mask[i].bool()
        row_ids = ids_padded[i][real].tolist()
        values = {k: v[i][real] for k, v in per_token.items()}
        if suffix:  # prefix | suffix, told apart by token_type_ids
            kinds = values["token_type_ids"].tolist()
            if 1 not in kinds:
                raise ValueError(f"example {ids[i]!r}: the processor marked no suffix token (token_type_ids)")
            cut_at = kinds.index(1)
            prompt, resp = row_ids[:cut_at], row_ids[cut_at:]
        else:  # the processor's prompt, then the template's assistant turn; per-token values of text are 0
            prompt, resp = row_ids, turns[i]
            values = {k: torch.cat([v, v.new_zeros(len(resp))]) for k, v in values.items()}
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
        row_extras.append({k: v[:len(prompt) + len(resp)] for k, v in values.items()})
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
        for k, v in row_extras[i].items():
            extras[k][i, :len(row)] = v
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
    """Greedy (deterministic) answers, batched with left padding, decoded without special tokens. Decoding stops
    at the eos, the format's end-of-turn token (`end_of_turn_ids`) or an eos of the model's generation config."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    stop = list(dict.fromkeys(end_of_turn_ids(processor) + configured))
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [format_prompt(processor, p) for p in prompts[i:i + batch_size]]
            enc = processor(images=images_argument(processor, images[i:i + batch_size]), text=texts,
                            return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k != "labels"}
            out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=stop)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers
