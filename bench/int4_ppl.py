"""SmolLM2 perplexity through the runtime for the INT4 modes, beside the 16-bit model and FP8.

Checkpoints: ModelOpt int4_awq HF export (`trtbuild quantize --precision int4_awq --format hf`, AWQ
calibration), ModelOpt's `gptq` algorithm on INT4 block-wise weights exported the same way (ModelOpt
writes GPTQ-calibrated INT4 in its W4A16_AWQ layout: the engine reads it as int4_awq), and
round-to-nearest at load (`quantization="int4_wo"`). SmolLM2's hidden size (576) takes group 64,
not 128. Scored by bench/quantized.py (teacher-forced, chunked through the paged pool).

    .venv/bin/python bench/int4_ppl.py --out bench/results/$(date +%F)-cpu-int4-ppl.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


from bench import quantized  # noqa: E402

GROUP = 64


def gptq_checkpoint(source: Path, out: Path, calib_size: int, calib_max_len: int) -> Path:
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    from trtbuild.build.quantize import DEFAULT_CALIBRATION

    tok = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    lines = [line for line in DEFAULT_CALIBRATION.read_text().splitlines() if line.strip()][:calib_size]
    calib = [tok(t, return_tensors="pt", truncation=True, max_length=calib_max_len).input_ids for t in lines]
    cfg = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: GROUP, "type": "static"}
    cfg["algorithm"] = {"method": "gptq", "block_size": GROUP}

    def loop(m):
        with torch.no_grad():
            for ids in calib:
                m(ids)

    model = mtq.quantize(model, cfg, forward_loop=loop)
    shutil.rmtree(out, ignore_errors=True)
    export_hf_checkpoint(model.to(torch.bfloat16), dtype=torch.bfloat16, export_dir=out)
    for f in source.iterdir():
        if f.is_file() and ("token" in f.name or f.name.endswith(".jinja")) and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--calib-max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    from trtbuild.checkpoint import write_demo_checkpoint
    from trtbuild.build.quantize import QuantizeOptions, Tolerance, quantize

    work = Path(tempfile.mkdtemp())
    smollm2 = write_demo_checkpoint(work / "smollm2", "smollm2")
    report = {"group_size": GROUP, "calib_size": a.calib_size, "calib_max_len": a.calib_max_len, "rows": [], "seconds": {}}

    def score(name: str, checkpoint: Path, modes: list[str]) -> None:
        r = quantized.run(checkpoint, "cpu", "auto", modes, a.max_tokens, log=lambda s: print(f"  {name}: {s}", flush=True))
        for row in r["rows"]:
            row["checkpoint"] = name
            report["rows"].append(row)
        report["tokens"] = r["tokens"]
        if a.out:
            a.out.write_text(json.dumps(report, indent=2))

    quantized.MODES["int4_wo"] = dict(quantization="int4_wo", block_size=GROUP)
    score("smollm2 (bf16)", smollm2, ["base", "fp8", "int4_wo"])
    t = time.time()
    awq = work / "awq"
    quantize(smollm2, awq, QuantizeOptions(precision="int4_awq", format="hf", block_size=GROUP, calib_size=a.calib_size,
                                           calib_max_len=a.calib_max_len, tolerance=Tolerance(10.0, 0.0)))
    report["seconds"]["awq_calibration"] = round(time.time() - t, 1)
    score("ModelOpt int4_awq export", awq, ["base"])
    t = time.time()
    gptq = gptq_checkpoint(smollm2, work / "gptq", a.calib_size, a.calib_max_len)
    report["seconds"]["gptq_calibration"] = round(time.time() - t, 1)
    score("ModelOpt gptq (INT4 block-wise) export", gptq, ["base"])
    base = report["rows"][0]["perplexity"]
    print(f"{'checkpoint':40} {'mode':8} {'perplexity':>10} {'delta':>8} {'weights MiB':>12}")
    for row in report["rows"]:
        row["ppl_delta_vs_bf16"] = row["perplexity"] / base - 1
        print(f"{row['checkpoint']:40} {row['mode']:8} {row['perplexity']:>10.4f} {row['ppl_delta_vs_bf16']:>+8.2%} "
              f"{row['weight_bytes'] / 2**20:>12.1f}")
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
