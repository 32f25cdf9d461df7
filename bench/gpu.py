"""GPU benchmark of the trainer on a LLaVA-1.5-7B-shaped model with random weights: steps/s, tokens/s, peak memory,
MFU against the device's bf16 peak, and the rate of the reference precompute pass.

    .venv/bin/python bench/gpu.py                  # one H100/H200: unattended, under 8 minutes -> reports/bench/gpu.json
    .venv/bin/python bench/gpu.py --layers 8       # fewer language-model layers (smaller GPUs, quicker look)
    .venv/bin/python bench/gpu.py --smoke          # tiny sizes, runs on CPU in seconds: proves the code path only

Without CUDA (and without --smoke) it says that it needs a GPU and exits with status 0, writing nothing.

Model: `LlavaForConditionalGeneration` with LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px: 24 layers, width 1024,
576 image tokens; 2-layer GELU projector; Llama: 32 layers, width 4096, MLP 11008, 32 heads, vocabulary 32064),
RANDOMLY INITIALISED on the GPU (nothing downloaded; step time does not depend on the weights: rows are
teacher-forced, their lengths fixed by the data). Its processor: llava-hf's chat format over a word-level tokenizer
of synthetic words, so a prompt of P words is exactly P tokens (default: 24-word prompts, 120-word answers, as in
RLAIF-V-style data). Data: `--examples` synthetic examples (random 336 px images written once to a temp folder),
each with a chosen and a rejected answer, K = 3 mined negatives and a candidate pool of `--pool` images with a
proposal q, in the shard format the trainer reads.

Configurations (each: bf16, gradient checkpointing, batch `--batch` examples, AdamW, clip 1.0, cached reference,
the `misp` preset; vision tower frozen as the trainer's default):
  lora-k3    LoRA r=16 on every linear layer of the language model (weights bf16), K = 3 image negatives
  lora-is4   the same with importance sampling, K' = 4 draws from the pool under the shard's q (is_mode fixed)
  full-k3    full fine-tuning of the language model and projector (fp32 master weights, bf16 autocast: what the
             trainer does), K = 3; `--full-layers auto` keeps as many layers as fit the GPU's memory with AdamW
  full-is4   the same with IS, K' = 4

A timed step is the trainer's own `trainer.step.step` on a `trainer.state.build` state (rows, `encode_rows` with
the processor, the policy forward, the reference lookup, `compute_loss`, backward; then clipping, AdamW, the
scheduler, the metrics), as in bench/train.py; the reference precompute is the trainer's own pass
(`trainer.state.precompute_reference`), timed once per configuration over every row its steps use (IS: the whole pool of each example). Tokens are counted by a hook on
the model's forward (attention mask), so tokens/s is exact. MFU = model FLOPs per step / step time / peak, with
model FLOPs by the PaLM formula (6N per token for trained weights, 4N through frozen ones, 2N forward-only
for the vision tower, plus 12·L·d·T attention): recomputation by gradient checkpointing is not counted (that
would be HFU). Peaks (bf16 dense, no sparsity) by device name: PEAK_BF16 below, or `--peak-tflops`.

A global deadline (`--deadline-minutes`, default 7.5) skips configurations that would start too late and says
so in the JSON; an out-of-memory configuration is recorded as such and the run goes on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 dense peak FLOP/s by device-name substring, first match wins (vendor datasheets, without sparsity).
PEAK_BF16 = [
    ("GH200", 989.4e12), ("H200 NVL", 835e12), ("H200", 989.4e12), ("H100 NVL", 835e12),
    ("H100 PCIe", 756.5e12), ("H100", 989.4e12), ("H800", 989.4e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
]
CONFIGS = {
    "lora-k3": (True, {}), "lora-is4": (True, {"is_mode": "fixed", "k_prime": 4}),
    "full-k3": (False, {}), "full-is4": (False, {"is_mode": "fixed", "k_prime": 4}),
}
PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# llava-hf's LLaVA-1.5 chat format.
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@dataclass(frozen=True)
class Shape:
    """The model's sizes (defaults: LLaVA-1.5-7B)."""

    layers: int = 32
    """Language-model layers."""
    hidden: int = 4096
    """Language-model width."""
    intermediate: int = 11008
    """Language-model MLP width."""
    heads: int = 32
    """Attention heads (head size hidden / heads)."""
    vocab: int = 32064
    """Vocabulary (embedding rows)."""
    vision_layers: int = 24
    """CLIP ViT layers."""
    vision_hidden: int = 1024
    """CLIP ViT width."""
    image_size: int = 336
    """Input image side (patch 14: (side / 14)^2 image tokens)."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // 14) ** 2


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


# ---------------------------------------------------------------------------------------------- model and data
def build_processor(n_words: int, shape: Shape):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, IMAGE, "USER", "ASSISTANT", ":"]
                                        + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                        pad_token=PAD, extra_special_tokens={"image_token": IMAGE},
                                        model_max_length=8192)
    image_processor = CLIPImageProcessor(size={"shortest_edge": shape.image_size},
                                         crop_size={"height": shape.image_size, "width": shape.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=TEMPLATE, image_token=IMAGE)


def build_model(shape: Shape, layers: int, processor, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = dict(model_type="clip_vision_model", hidden_size=shape.vision_hidden,
                  intermediate_size=4 * shape.vision_hidden, num_hidden_layers=shape.vision_layers,
                  num_attention_heads=max(1, shape.vision_hidden // 64), image_size=shape.image_size, patch_size=14,
                  projection_dim=768)
    text = dict(model_type="llama", vocab_size=max(shape.vocab, len(tok)), hidden_size=shape.hidden,
                intermediate_size=shape.intermediate, num_hidden_layers=layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, image_seq_length=shape.image_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def make_examples(folder: Path, args, shape: Shape, rng: np.random.Generator) -> list[dict]:
    """Synthetic examples in the shard format: image, prompt, chosen, rejected, K = 3 negatives, a pool with q.
    The images go through pool ingest into `<folder>/data`'s ledger, as mined images do (the trainer reads only
    images whose sha256 ingest recorded)."""
    from PIL import Image

    from pipeline.ingest import ingest_pool
    from store.parquet_io import write_parquet_atomic
    from store.safe_image import ledger_file

    n_images = args.examples + args.pool + 4
    paths = []
    (folder / "images").mkdir()
    for i in range(n_images):
        path = folder / "images" / f"img{i:04d}.png"
        pixels = rng.integers(0, 255, (shape.image_size, shape.image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    ingested = ingest_pool(folder / "images", shard=0, num_shards=1, progress=False, require_usable=True)
    write_parquet_atomic(ingested.images, ledger_file(folder / "data", "pool", "000"))

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, args.words, n))

    examples = []
    for e in range(args.examples):
        others = [p for p in paths if p != paths[e]]
        pool_paths = [others[i] for i in rng.choice(len(others), args.pool, replace=False)]
        q = rng.dirichlet(np.ones(args.pool))
        pool = [{"path": p, "q": float(qi), "score": float(rng.random()), "clip_sim": float(rng.random()),
                 "code_idx": [0], "code_val": [0.0]} for p, qi in zip(pool_paths, q)]
        examples.append({"example_id": f"ex{e:04d}", "image_path": paths[e], "prompt": words(args.prompt_tokens),
                         "chosen": words(args.response_tokens), "rejected": words(args.response_tokens),
                         "negatives": pool[:3], "pool": pool})
    return examples


# ---------------------------------------------------------------------------------------------- counting
class TokenCounter:
    """Forward pre-hook on the VLM: rows, tokens (attention mask), sum of squared row lengths (attention FLOPs)
    and logits kept, separately for forwards with and without gradients."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.grad = {"rows": 0, "tokens": 0, "tokens_sq": 0, "kept": 0}
        self.no_grad = dict(self.grad)

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:
            return
        lengths = mask.sum(1)
        target = self.grad if torch.is_grad_enabled() else self.no_grad
        target["rows"] += int(mask.shape[0])
        target["tokens"] += int(lengths.sum())
        target["tokens_sq"] += int((lengths * lengths).sum())
        keep = kwargs.get("logits_to_keep") or int(mask.shape[1])
        target["kept"] += int(keep) * int(mask.shape[0])


def model_flops(counts: dict, shape: Shape, layers: int, lora: bool, n_vision: int, n_projector: int,
                n_language: int) -> float:
    """Model FLOPs of the forwards and backwards behind `counts` (module docstring)."""
    trained = 4 if lora else 6  # LoRA: forward 2N + activation gradients 2N through frozen weights
    text = trained * n_language * counts["tokens"] + 3 * 4 * layers * shape.hidden * counts["tokens_sq"]
    head = trained * shape.hidden * shape.vocab * counts["kept"]
    image_rows = counts["rows"]  # one image per row
    patches = shape.image_tokens + 1
    vision = image_rows * (2 * n_vision * patches + 4 * shape.vision_layers * shape.vision_hidden * patches ** 2)
    projector = 6 * n_projector * shape.image_tokens * image_rows  # trained in both modes
    return float(text + head + vision + projector)


# ---------------------------------------------------------------------------------------------- one group
def full_layers_that_fit(shape: Shape, total_bytes: int, tokens_per_step: int) -> int:
    """Most language-model layers (<= shape.layers) whose full fine-tuning fits: fp32 weights, gradients and two
    AdamW moments (16 bytes per trained parameter), the frozen vision tower, checkpointed activations, a margin."""
    per_layer = 4 * shape.hidden * shape.hidden + 3 * shape.hidden * shape.intermediate
    fixed = 16 * 2 * shape.vocab * shape.hidden + 4 * 12 * shape.vision_layers * shape.vision_hidden ** 2
    for layers in range(shape.layers, 0, -1):
        activations = tokens_per_step * shape.hidden * 2 * (layers + 24)  # checkpoints + one layer recomputed
        if fixed + 16 * per_layer * layers + activations + 6 * 2 ** 30 <= 0.85 * total_bytes:
            return layers
    return 1


def run_group(names: list[str], lora: bool, layers: int, examples: list[dict], processor, shape: Shape, args,
              acc, device, tmp: Path, deadline: float) -> list[dict]:
    from trainer.config import load_config
    from trainer.ref_cache import RefCache
    from trainer.state import build, precompute_reference
    from trainer.step import batch_at, batch_indices, step as train_step
    from trainer.trainable import prepare_trainable

    cuda = device.type == "cuda"
    results = []
    base_args = ["--data_root", str(tmp / "data"), "--preset", "misp", "--batch_size", str(args.batch), "--gradient_checkpointing", "true",
                 "--precision", "bf16" if cuda else "no", "--lr", "1e-5", "--warmup_steps", "1",
                 "--max_steps", str(args.warmup + args.steps),
                 "--max_length", str(shape.image_tokens + args.prompt_tokens + args.response_tokens + 64),
                 "--lora", str(lora).lower(), "--lora_r", "16", "--lora_alpha", "32"]
    t_build = time.perf_counter()
    dtype = torch.bfloat16 if (lora and cuda) else torch.float32  # the trainer's choice (trainer.train.train)
    model = build_model(shape, layers, processor, device, dtype)
    n_vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    n_projector = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n)
    n_language = sum(p.numel() for n, p in model.named_parameters()
                     if "language_model" in n and "embed_tokens" not in n)
    counter = TokenCounter()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    cfg0 = load_config(None, base_args)
    model = prepare_trainable(model, cfg0)  # the same trainable set for every configuration of the group
    build_s = time.perf_counter() - t_build
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{'LoRA' if lora else 'full'} model: {layers} language layers, {n_language / 1e9:.2f} B language "
          f"parameters, {trainable / 1e6:.1f} M trained, built in {build_s:.0f} s", flush=True)
    for name in names:
        entry = {"name": name, "lora": lora, "layers": layers, "trained_parameters": trainable,
                 "language_parameters": n_language, "model_build_s": build_s}
        if time.perf_counter() > deadline - args.reserve_s:
            entry["status"] = "skipped: the deadline (--deadline-minutes) was near"
            results.append(entry)
            print(f"  {name}: skipped (deadline)", flush=True)
            continue
        overrides = [a for k, v in CONFIGS[name][1].items() for a in (f"--loss.{k}", str(v))]
        cfg = load_config(None, base_args + overrides)
        state = None
        try:
            steps = args.warmup + args.steps
            used = sorted({i for s in range(steps) for i in batch_indices(s, len(examples), cfg.batch_size, cfg.seed)})
            cache = RefCache(tmp / "ref_cache", f"{name}-{layers}")
            # the model is already trainable (prepare_trainable above), shared by the group's configurations
            state = build(cfg, progress=False, accelerator=acc, examples=examples, model=model, processor=processor,
                          cache=cache)
            counter.reset()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            # the trainer's pass over the run's schedule (cfg.max_steps micro-batches, or every pool row with IS)
            needed, computed = precompute_reference(state, progress=False)
            if cuda:
                torch.cuda.synchronize()
            ref_s = time.perf_counter() - t0
            ref_tokens = counter.no_grad["tokens"]
            entry["reference"] = {"examples": len(used), "rows": computed, "seconds": ref_s,
                                  "rows_per_s": computed / ref_s, "tokens_per_s": ref_tokens / ref_s,
                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
            times, flops, tokens, rows, losses = [], [], [], [], []
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            step = 0
            budget_end = time.perf_counter() + args.budget_s
            while step < steps:
                counter.reset()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = train_step(state, batch_at(state, step))
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if not math.isfinite(out.loss):
                    raise RuntimeError(f"{name}: non-finite loss at step {step}")
                if step >= args.warmup:
                    times.append(dt)
                    tokens.append(counter.grad["tokens"])
                    rows.append(out.rows)
                    losses.append(out.loss)
                    flops.append(model_flops(counter.grad, shape, layers, lora, n_vision, n_projector, n_language))
                step += 1
                if step > args.warmup and (time.perf_counter() > budget_end or time.perf_counter() > deadline):
                    break
            med = statistics.median(times)
            i_med = times.index(sorted(times)[len(times) // 2])
            entry.update({
                "status": "ok", "timed_steps": len(times), "s_per_step": med, "steps_per_s": 1 / med,
                "step_times": times, "rows_per_step": statistics.mean(rows),
                "tokens_per_step": statistics.mean(tokens), "tokens_per_s": statistics.mean(tokens) / med,
                "model_tflops_per_step": flops[i_med] / 1e12,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None,
                "loss": losses})
            if args.peak:
                entry["mfu"] = statistics.median(f / t for f, t in zip(flops, times)) / args.peak
            print(f"  {name:9s} {med:7.3f} s/step  {entry['tokens_per_s']:9.0f} tok/s  "
                  f"MFU {entry.get('mfu', float('nan')):.3f}  peak {entry['peak_memory_gib'] or 0:.1f} GiB  "
                  f"ref {entry['reference']['rows_per_s']:.1f} rows/s", flush=True)
        except torch.cuda.OutOfMemoryError as err:
            entry["status"] = f"out of memory: {str(err).splitlines()[0]}"
            print(f"  {name}: out of memory", flush=True)
        if state is not None:  # the next configuration starts from the bare module, its optimizer state freed
            model = acc.unwrap_model(state.model, keep_fp32_wrapper=False)
            del state
            acc.free_memory()
        results.append(entry)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------------- main
def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="language-model layers (default 32; smoke 2)")
    ap.add_argument("--hidden", type=int, default=None, help="language-model width (default 4096; smoke 64)")
    ap.add_argument("--full-layers", default="auto",
                    help="layers for full fine-tuning: 'auto' (as many as fit the GPU's memory) or a number")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default 8; smoke 2)")
    ap.add_argument("--examples", type=int, default=None, help="synthetic examples (default 16; smoke 4)")
    ap.add_argument("--pool", type=int, default=None, help="candidate pool per example (default 16; smoke 6)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt words = tokens (default 24)")
    ap.add_argument("--response-tokens", type=int, default=None, help="answer words = tokens (default 120)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration at most (default 5)")
    ap.add_argument("--budget-s", type=float, default=45.0, help="timed seconds per configuration at most")
    ap.add_argument("--deadline-minutes", type=float, default=7.5, help="skip configurations that would start later")
    ap.add_argument("--reserve-s", type=float, default=75.0, help="a configuration needs this much before the deadline")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device (default: by name)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (code path only, no figures)")
    ap.add_argument("--out", default=None, help="result JSON (default reports/bench/gpu.json; smoke: a temp file)")
    args = ap.parse_args(argv)
    small = args.smoke
    defaults = {"layers": 2 if small else 32, "hidden": 64 if small else 4096, "batch": 2 if small else 8,
                "examples": 4 if small else 16, "pool": 6 if small else 16, "prompt_tokens": 8 if small else 24,
                "response_tokens": 12 if small else 120, "steps": 1 if small else 5}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; choose from {list(CONFIGS)}")
    args.words = 1000
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench/gpu.py needs a CUDA GPU and none is available here; nothing was measured or written. "
              "To check the code path on CPU: bench/gpu.py --smoke")
        return 0
    from accelerate import Accelerator
    import transformers

    device = torch.device("cuda" if cuda else "cpu")
    t_start = time.perf_counter()
    deadline = t_start + 60 * args.deadline_minutes
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    args.peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if cuda else None)
    if args.smoke:
        shape = Shape(layers=args.layers, hidden=args.hidden, intermediate=2 * args.hidden,
                      heads=max(1, args.hidden // 16), vocab=1100, vision_layers=2, vision_hidden=32, image_size=56)
    else:
        shape = Shape(layers=args.layers, hidden=args.hidden, intermediate=int(round(args.hidden * 11008 / 4096)),
                      heads=max(1, args.hidden // 128))
    acc = Accelerator(mixed_precision="bf16" if cuda else "no")
    processor = build_processor(args.words, shape)
    rng = np.random.default_rng(0)
    names = args.configs.split(",")
    tokens_per_step = args.batch * (2 + 4) * (shape.image_tokens + args.prompt_tokens + args.response_tokens + 8)
    if args.full_layers == "auto":
        full_layers = (full_layers_that_fit(shape, torch.cuda.get_device_properties(0).total_memory, tokens_per_step)
                       if cuda else shape.layers)
    else:
        full_layers = int(args.full_layers)
    print(f"{name}: bf16 peak {args.peak / 1e12 if args.peak else float('nan'):.0f} TFLOP/s; LoRA on "
          f"{shape.layers} layers, full fine-tuning on {full_layers}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        examples = make_examples(tmp, args, shape, rng)
        for lora, layers in ((True, shape.layers), (False, full_layers)):
            group = [n for n in names if CONFIGS[n][0] == lora]
            if group:
                results += run_group(group, lora, layers, examples, processor, shape, args, acc, device, tmp,
                                     deadline)
    report = {
        "device": name, "cuda": cuda, "smoke": args.smoke, "bf16_peak_flops": args.peak,
        "shape": shape.__dict__, "image_tokens": shape.image_tokens, "full_fine_tuning_layers": full_layers,
        "settings": {k: getattr(args, k) for k in ("batch", "examples", "pool", "prompt_tokens", "response_tokens",
                                                   "warmup", "steps", "budget_s", "configs")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "total_seconds": time.perf_counter() - t_start, "results": results,
    }
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "gpu-smoke.json" if args.smoke
                                           else REPO / "reports" / "bench" / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from store.parquet_io import write_json_atomic

    write_json_atomic(report, out)
    print(f"wrote {out} ({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
