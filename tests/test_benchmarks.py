"""The benchmark scripts run end to end on a tiny model, so they do not rot (nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_methods_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_methods.py"), "--models", "test_vit",
           "--variants", "full,lora,lora-qkv,peft-lora", "--batch", "2", "--steps", "2",
           "--warmup", "1", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["models"]["test_vit"]
    assert set(rows) >= {"full", "lora", "lora-qkv", "peft-lora", "base", "base-copy", "lora-merged"}
    assert rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["lora-qkv"]["trainable"] == rows["peft-lora"]["trainable"]  # same config as HF PEFT
    for variant in ("full", "lora", "peft-lora"):
        assert rows[variant]["step_s"] > 0 and rows[variant]["growth_mb"] > 0
    assert "Our LoRA vs HF PEFT" in proc.stdout


def test_bench_lora_layer_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "layer.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lora_layer.py"), "--dim", "16", "--tokens", "5",
           "--batch", "2", "--rounds", "2", "--warmup", "1", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = json.loads(out.read_text())["median_ms"]
    assert {"frozen", "lora q,v", "lora q,k,v", "lora qkv", "peft lora qkv"} <= set(ms)
    assert all(v > 0 for v in ms.values())
    assert "| frozen |" in proc.stdout


def test_real_backbone_summary_averages_seeds(tmp_path):
    """The real-backbone benchmark's table (its runs are tested in test_real_backbone.py)."""
    runs = [{"run": "lora", "seed": s, "test_top1": v, "wall_seconds": 10.0 * (s + 1)} for s, v in enumerate((80.0, 82.0, 84.0))]
    (tmp_path / "r.json").write_text(json.dumps({"runs": runs}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_backbone.py"), "--summary", str(tmp_path / "r.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "| lora | 3 | 82.0 ± 2.0 | 80.0, 82.0, 84.0 | 20 |" in out
