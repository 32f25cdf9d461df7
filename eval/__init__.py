"""Evaluation harness: hallucination benchmarks for any local HF VLM folder (no Dagster here).

    python -m eval --model data/models/base --world data/world/default-seed0
    from eval.run import EvalConfig, evaluate_model

Modules: `metrics` (pure POPE and CHAIR functions), `pope_world` (POPE-style probes from the scene world),
`pope_reader` (public POPE question files), `run` (generation, scoring, JSON, CLI). See docs/eval.md.
Import submodules by name (`from eval.metrics import ...`): `import eval` would hide the builtin `eval`.
"""
