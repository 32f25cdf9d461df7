"""An open_clip encoder configured by architecture + checkpoint, that embeds images and texts in batches.

Checkpoints load from local files only unless the user is online:
  - `model="local-dir:/path"`: a folder with `open_clip_config.json` + weights (the world CLIP is saved so);
  - `model="ViT-B-32", pretrained="/path/to/weights.safetensors"`: a built-in architecture + a local file;
  - `model="ViT-B-32", pretrained="random"`: random init, only when asked for by name (benchmarks): a built-in
    architecture with no weights is refused, since mining with a random CLIP degrades silently (nothing fails,
    and the candidates, near-duplicate exclusion and SAE codes are meaningless);
  - `model="hf-hub:org/repo"` or a pretrained *tag*: downloads, so only when online (HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image
from tqdm.auto import tqdm

from store.fingerprint import fingerprint, sha256_file

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
RANDOM = "random"
"""`pretrained` value that asks for a randomly initialised CLIP on purpose (MISP_CLIP_PRETRAINED=random)."""


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load."""

    model: str
    """open_clip architecture name (`ViT-B-32`), `local-dir:<folder>` or `hf-hub:<repo>`."""
    pretrained: str | None = None
    """Weights file (or an open_clip tag, online only) for a built-in architecture; `random` = random init on
    purpose (benchmarks). Required for a built-in architecture."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ..."""
    precision: str = "fp32"
    """open_clip precision: `fp32`, `bf16`, `fp16` (the latter two on GPU)."""
    seed: int = 0
    """Seed of the random init (`pretrained="random"`, benchmarks)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("ClipSpec.model is empty: name an open_clip architecture or a 'local-dir:' folder")
        if self.model.startswith(LOCAL_DIR):
            folder = Path(self.model[len(LOCAL_DIR):]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"CLIP folder {folder} has no open_clip_config.json; a local-dir checkpoint needs "
                    "open_clip_config.json and open_clip_model.safetensors (or .bin)"
                )
        if self.precision not in {"fp32", "bf16", "fp16", "pure_bf16", "pure_fp16", "amp", "amp_bf16"}:
            raise ValueError(f"unknown precision {self.precision!r}; use fp32, bf16 or fp16")
        if not self.model.startswith((LOCAL_DIR, "hf-hub:")) and not self.pretrained:
            raise ValueError(
                f"CLIP architecture {self.model!r} is given without weights: a randomly initialised CLIP mines "
                "without any error, but its retrieval, near-duplicate exclusion and SAE codes mean nothing. Set "
                "MISP_CLIP_PRETRAINED (ClipModel.pretrained / ClipSpec.pretrained) to a local weights file, e.g. "
                "/models/open_clip_model.safetensors, or use MISP_CLIP_MODEL=local-dir:<folder>; if you really want "
                f"random weights (benchmarks), say so: MISP_CLIP_PRETRAINED={RANDOM}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def checkpoint_fingerprint(spec: ClipSpec) -> str:
    """Identity of the weights that will be loaded: content hashes of local files, or the spec itself."""
    if spec.model.startswith(LOCAL_DIR):
        folder = Path(spec.model[len(LOCAL_DIR):]).expanduser()
        files = sorted(p for p in folder.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".pth"}
                       and p.name != "metrics.json")
        return fingerprint("local-dir", [(p.name, sha256_file(p)) for p in files])
    if spec.pretrained and os.path.isfile(spec.pretrained):
        return fingerprint("file", spec.model, sha256_file(Path(spec.pretrained)))
    return fingerprint("spec", spec.model, spec.pretrained, spec.seed)


class ClipEncoder:
    """A loaded open_clip model with its preprocessing and tokenizer, in eval mode."""

    def __init__(self, spec: ClipSpec):
        self.spec = spec
        self.device = spec.resolved_device()
        torch.manual_seed(spec.seed)
        schema = spec.model.startswith(LOCAL_DIR) or spec.model.startswith("hf-hub:")
        random_init = spec.pretrained == RANDOM
        if random_init:
            log.warning(f"CLIP {spec.model} with random weights (pretrained={RANDOM!r}): fine for benchmarks, "
                        "useless for mining")
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model,
            pretrained=None if schema or random_init else spec.pretrained,
            precision=spec.precision,
            device=self.device,
            # A missing local weight file must fail loudly, not silently give a random model.
            require_pretrained=(bool(spec.pretrained) and not random_init) or spec.model.startswith(LOCAL_DIR),
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.fingerprint = checkpoint_fingerprint(spec)
        self.dim = int(self._probe_dim())

    def _probe_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _load_image(self, path: str | Path, open_image=None) -> torch.Tensor:
        with (open_image(path) if open_image is not None else Image.open(path)) as im:
            # 16-bit, palette, alpha and CMYK images all become 8-bit RGB, as CLIP was trained on.
            if im.mode in {"I;16", "I;16B", "I;16L", "I"}:
                arr = np.asarray(im, dtype=np.float64)
                arr = (255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)).astype(np.uint8)
                im = Image.fromarray(arr)
            return self.preprocess(im.convert("RGB"))

    def embed_images(self, paths: Sequence[str | Path], *, batch_size: int = 256, progress: bool = True,
                     desc: str = "embed images", open_image=None) -> np.ndarray:
        """L2-normalised image embeddings, float32 (N, D), in the order of `paths`. `open_image(path)`: how to
        open one (the pipeline passes `store.safe_image`'s checked, upright opener); default `Image.open`."""
        out = np.empty((len(paths), self.dim), dtype=np.float32)
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(paths), batch_size):
                batch = torch.stack([self._load_image(p, open_image) for p in paths[start:start + batch_size]])
                feats = self.model.encode_image(batch.to(self.device), normalize=True)
                out[start:start + len(batch)] = feats.float().cpu().numpy()
                bar.update(len(batch))
        bar.close()
        return out

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 512, progress: bool = True,
                    desc: str = "embed texts") -> np.ndarray:
        """L2-normalised text embeddings, float32 (N, D). Texts longer than the context are truncated."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
                feats = self.model.encode_text(tokens, normalize=True)
                out[start:start + len(tokens)] = feats.float().cpu().numpy()
                bar.update(len(tokens))
        bar.close()
        return out
