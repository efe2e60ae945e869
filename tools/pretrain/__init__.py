"""Pretraining of the backbones shipped in `peftvision/backbones/`, and the evidence that it helps.

- `python -m tools.pretrain --recipe recipes/pretrain-<name>.yaml`: train on procedurally
  generated scenes (`scenes.py`), save fp16 safetensors + a JSON record (`run.py`).
- `python -m tools.pretrain.probe`: linear-probe accuracy of the shipped weights vs. the same
  architecture randomly initialised, on every built-in task (`probe.py`).
"""
