"""The main job on the embedded default: checkpoint -> repository -> local Triton -> gRPC/HTTP.

It also checks the served greedy answer against transformers `generate` on the same checkpoint, so
the demo proves correctness, not only that something came back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trtbuild.checkpoint import load_model_spec, write_demo_checkpoint
from trtbuild.errors import TrtbuildError
from trtbuild.runtimes import generate as generate_repository
from trtbuild.deploy.server import TritonServer
from trtbuild.spec import BuildSpec

PROMPTS = (
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
)


def reference_greedy(checkpoint: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """transformers `generate` (greedy) on the checkpoint: what the server must reproduce."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return out


def server_counts(metrics: str, model: str) -> dict[str, float]:
    counts = {}
    for line in metrics.splitlines():
        if line.startswith(("nv_inference_request_success", "nv_inference_request_failure")) and f'model="{model}"' in line:
            counts[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def run_demo(workdir: Path, *, kind: str = "smollm2", max_tokens: int = 32, console: Console | None = None) -> dict:
    from trtbuild.clients.generate import generate

    console = console or Console(stderr=True)
    workdir = Path(workdir).absolute()
    checkpoint = workdir / f"checkpoint-{kind}"
    if not (checkpoint / "config.json").is_file():
        with console.status(f"writing the {kind} demo checkpoint (once)"):
            write_demo_checkpoint(checkpoint, kind, force=True)
    spec = BuildSpec(checkpoint=checkpoint, model=load_model_spec(checkpoint), max_batch_size=4,
                     max_input_len=256, max_output_len=max(64, max_tokens))
    repository = generate_repository(spec, workdir / "model_repo", force=True)
    console.print(f"[green]repository[/] {repository}: {', '.join(sorted(p.name for p in repository.iterdir() if p.is_dir()))}")

    with console.status("computing the transformers reference"):
        reference = reference_greedy(checkpoint, list(PROMPTS), max_tokens)

    server = TritonServer(repository, log_path=workdir / "tritonserver.log")
    started = time.monotonic()
    with console.status("starting tritonserver") as status:
        server.start(progress=lambda s: status.update(f"starting tritonserver ({s:.0f} s)"))
    rows = []
    try:
        console.print(f"[green]server ready[/] in {time.monotonic() - started:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}")
        calls = [
            ("grpc", "ensemble", False, PROMPTS[0]),
            ("grpc", "ensemble", True, PROMPTS[1]),
            ("http", "ensemble", False, PROMPTS[2]),
            ("http", spec.names.bls, True, PROMPTS[0]),
        ]
        for protocol, model, stream, prompt in calls:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            result = generate(url, prompt, max_tokens, protocol=protocol, model=model, stream=stream)
            expected = reference[PROMPTS.index(prompt)]
            rows.append(dict(protocol=protocol, model=model, stream=stream, prompt=prompt, text=result.text,
                             chunks=len(result.chunks), ttft_ms=result.ttft * 1e3, latency_ms=result.latency * 1e3,
                             matches_reference=result.text == expected))
        counts = server_counts(server.metrics(), "ensemble")
    finally:
        server.stop()

    out = Console()
    table = Table(title=f"trtbuild demo: {kind} on local Triton 2.51 (transformers runtime, CPU)")
    for col in ("#", "protocol", "model", "stream", "chunks", "TTFT ms", "latency ms", "= transformers greedy"):
        table.add_column(col)
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), r["protocol"], r["model"], str(r["stream"]), str(r["chunks"]), f"{r['ttft_ms']:.0f}",
                      f"{r['latency_ms']:.0f}", "[green]yes[/]" if r["matches_reference"] else "[red]no[/]")
    out.print(table)
    for i, r in enumerate(rows, 1):
        out.print(f"[bold]{i}.[/] {r['prompt']}[cyan]{r['text']}[/]", highlight=False)
    out.print(f"server counts for the ensemble (/metrics): {counts}")
    report = {"checkpoint": str(checkpoint), "repository": str(repository), "calls": rows, "server_counts": counts}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    if not all(r["matches_reference"] for r in rows):
        raise TrtbuildError("a served answer differs from transformers greedy generation", hint=f"see {workdir / 'report.json'}")
    return report
