"""`trtbuild validate`: measure a build against its original checkpoint and fail when it is too far."""

from __future__ import annotations

from pathlib import Path

import click

from trtbuild.cli.console import console
from trtbuild.errors import TrtbuildError
from trtbuild.quality.validate import (
    DEFAULT_CORPUS,
    DEFAULT_PROMPTS,
    DEFAULT_THRESHOLDS,
    FAKE_QUANT_PRECISIONS,
    Thresholds,
    ValidationReport,
    VariantResult,
    VariantSpec,
    checkpoint_precision,
    corpus_settings,
    evaluate_gates,
    markdown_table,
    merge_reports,
    normalize_precision,
    validate_offline,
    write_report,
)


class Fraction(click.ParamType):
    """A fraction: 0.02 or 2%."""

    name = "fraction"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number or a percentage (0.02 or 2%)", param, ctx)


PRECISION = click.Choice(sorted({*DEFAULT_THRESHOLDS, "float32", "float16", "bfloat16"}))


@click.command("validate")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, metavar="hf:DIR|onnx:PATH",
              help="A build to compare with CHECKPOINT: another HF checkpoint or an ONNX export. Repeatable.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(FAKE_QUANT_PRECISIONS),
              help="Fake-quantize CHECKPOINT with ModelOpt in memory and compare it. Repeatable.")
@click.option("--gate-precision", type=PRECISION, default=None,
              help="Thresholds for --variant builds. Default: read from the variant (config dtype/quantization, ONNX weights).")
@click.option("--corpus", type=click.Path(path_type=Path), default=DEFAULT_CORPUS, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per scored window.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N corpus tokens.")
@click.option("--calib-samples", type=int, default=None,
              help="Calibration samples (lines of trtbuild/data/calibration.txt) for --precision; default: trtbuild quantize's.")
@click.option("--server", "url", default=None, metavar="HOST:PORT",
              help="Also validate a running server (gRPC port for grpc, HTTP port for http).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--model", default="ensemble", show_default=True, help="Served model: ensemble or the BLS model.")
@click.option("--prompts", type=click.Path(path_type=Path), default=DEFAULT_PROMPTS, show_default=True)
@click.option("--max-new-tokens", type=int, default=None, help="Override every prompt's max_tokens.")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Requests in flight.")
@click.option("--log-probs/--no-log-probs", default=True, show_default=True, help="Ask the server for output_log_probs.")
@click.option("--served-precision", type=PRECISION, default=None,
              help="Thresholds for the served build. Default: the served LLM's dtype parameter.")
@click.option("--max-ppl-delta", type=Fraction(), default=None, help="Max relative perplexity increase (0.02 or 2%).")
@click.option("--max-kl", type=float, default=None, help="Max mean KL divergence (nats).")
@click.option("--min-top1-agreement", type=Fraction(), default=None)
@click.option("--max-logit-diff", type=float, default=None)
@click.option("--min-exact-match", type=Fraction(), default=None, help="Online: min fraction of identical answers.")
@click.option("--min-token-agreement", type=Fraction(), default=None, help="Online: min fraction of matching tokens.")
@click.option("--max-logprob-delta", type=float, default=None, help="Online: max |served - reference| log-prob.")
@click.option("--compare", "compare", multiple=True, type=click.Path(path_type=Path), metavar="REPORT.json",
              help="Earlier validate reports to show side by side (with or without a new run). Repeatable.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write report.json, report.md, deltas.png here.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def validate_cmd(checkpoint, variants, precisions, gate_precision, corpus, seq_len, max_tokens, calib_samples,
                 url, protocol, model, prompts, max_new_tokens, concurrency, log_probs, served_precision,
                 compare, out, force, **limits) -> None:
    """Compare builds with CHECKPOINT (perplexity, KL, top-1, served greedy answers); exit 1 if a gate fails.

    \b
    trtbuild validate CKPT --variant hf:CKPT-bf16 --precision fp8 --precision int4_awq --out val/
    trtbuild validate CKPT --server 127.0.0.1:8001 --model ensemble
    trtbuild validate --compare a/report.json b/report.json --out cmp/
    """
    overrides = Thresholds(**limits)
    earlier = merge_reports(compare) if compare else []
    if checkpoint is None:
        if not earlier:
            raise TrtbuildError("nothing to validate", hint="give a CHECKPOINT, or --compare REPORT.json ...")
        report = ValidationReport(None, {"compared": [str(p) for p in compare]}, earlier)
        click.echo(markdown_table(earlier, title="Comparison of earlier reports"))
        if out:
            write_report(report, out, inputs=compare, force=force)
            console.print(f"[green]wrote[/] {out}/report.md, deltas.png")
        return
    if not variants and not precisions and not url:
        raise TrtbuildError("nothing to compare with the checkpoint",
                            hint="pass --variant hf:DIR / onnx:PATH, --precision FORMAT or --server HOST:PORT")
    inputs = (checkpoint, corpus, prompts, *compare, *(v.split(":", 1)[-1] for v in variants))
    if out:
        from trtbuild.atomic import check_output_dir

        check_output_dir(Path(out), force, inputs=inputs)

    specs = [VariantSpec.parse(v, gate_precision) for v in variants] + [VariantSpec.fake_quant(p) for p in precisions]
    results: list[VariantResult] = []
    settings: dict = {}
    if specs:
        with console.status("offline validation") as status:
            offline, data = validate_offline(checkpoint, specs, corpus=corpus, seq_len=seq_len, max_tokens=max_tokens,
                                             overrides=overrides, calib_samples=calib_samples, progress=status.update)
        results += offline
        settings.update(corpus_settings(data), calib_samples=calib_samples)
    if url:
        results.append(_online(checkpoint, url, protocol, model, prompts, max_new_tokens, concurrency, log_probs,
                               served_precision, overrides))
        settings.update(prompts=str(Path(prompts).absolute()), server=url, protocol=protocol, model=model)

    report = ValidationReport(str(Path(checkpoint).absolute()), settings, results)
    click.echo(report.markdown())
    if earlier:
        click.echo(markdown_table(results + earlier, title="Compared with earlier reports"))
    if out:
        write_report(report, out, inputs=inputs, force=force, extra=earlier)
        console.print(f"[green]wrote[/] {out}/report.json, report.md, deltas.png")
    failures = [(r, g) for r in results for g in r.failures]
    for r, g in failures:
        console.print(f"[bold red]gate failed[/] {r.name}: {g.describe()}", highlight=False, soft_wrap=True)
    if failures:
        raise SystemExit(1)
    console.print(f"[green]all gates pass[/] ({sum(len(r.gates) for r in results)} checks)")


def _online(checkpoint, url, protocol, model, prompts, max_new_tokens, concurrency, log_probs, served_precision,
            overrides) -> VariantResult:
    from trtbuild.quality.accuracy import load_prompts, served_dtype, validate_online
    from trtbuild.clients.generate import GenerationError, ServerUnavailable

    def unreachable(e: Exception) -> TrtbuildError:
        return TrtbuildError(f"cannot reach a {protocol} server at {url} ({str(e).splitlines()[0]})",
                             hint="is the server running? start it with `trtbuild serve REPO`, and check --server and --protocol")

    items = load_prompts(prompts, max_tokens=max_new_tokens)
    try:
        precision = normalize_precision(served_precision or served_dtype(url, protocol) or checkpoint_precision(checkpoint))
        with console.status("online validation") as status:
            online = validate_online(checkpoint, url, items, protocol=protocol, model=model, log_probs=log_probs,
                                     concurrency=concurrency, progress=status.update)
    except ServerUnavailable as e:
        raise unreachable(e) from None
    except GenerationError as e:
        raise TrtbuildError(f"the server refused a request: {e}") from None
    except (ConnectionError, OSError) as e:
        raise unreachable(e) from None
    except Exception as e:  # tritonclient / grpc raise their own types when nothing listens
        if type(e).__module__.startswith(("tritonclient", "grpc", "requests")):
            raise unreachable(e) from None
        raise
    metrics = online.as_metrics()
    return VariantResult(
        name=f"served:{model}", kind="served", location=f"{protocol}://{url}", precision=precision, metrics=metrics,
        gates=evaluate_gates(metrics, precision, overrides),
        details={"logprob_note": online.logprob_note, "per_prompt": [c.to_json() for c in online.comparisons]},
    )
