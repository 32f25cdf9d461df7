"""Security properties that a grep can prove: no pickle, `torch.load` only with weights_only=True, remote code
off by default, the UI on loopback by default."""

import inspect
import re
from pathlib import Path

from trainer.config import TrainConfig
from trainer.model_loading import load_vlm

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "assets", "sae", "trainer", "world", "bench")


def _sources():
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def test_no_pickle_anywhere():
    offenders = [str(p.relative_to(REPO)) for p in _sources()
                 if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", p.read_text(), re.M)]
    assert not offenders, offenders


def test_torch_load_only_with_weights_only():
    calls = []
    for path in _sources():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the call's full argument list
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            calls.append((path.name, "weights_only=True" in call))
    assert calls, "expected the checkpoint loader to use torch.load"
    assert all(ok for _, ok in calls), [name for name, ok in calls if not ok]


def test_remote_code_is_off_by_default():
    assert TrainConfig().trust_remote_code is False
    assert inspect.signature(load_vlm).parameters["trust_remote_code"].default is False


def test_ui_binds_to_loopback_by_default():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^UI_HOST \?= 127\.0\.0\.1$", makefile, re.M)
    assert "dagster dev -h $(UI_HOST)" in makefile
