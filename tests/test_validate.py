"""`trtbuild validate`: offline logit comparison, gates, reports, and served answers vs transformers."""

import json
import math

import pytest
from click.testing import CliRunner

from trtbuild.cli import main
from trtbuild.quality.validate import (
    DEFAULT_CORPUS,
    DEFAULT_PROMPTS,
    Thresholds,
    ValidationReport,
    VariantSpec,
    evaluate_gates,
    load_corpus,
    validate_offline,
    write_variant_checkpoint,
)

TOKENS = 384  # corpus slice for the tiny model: mechanics only


def run(*args):
    result = CliRunner().invoke(main, ["validate", *[str(a) for a in args]])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def noisy_checkpoint(tiny_checkpoint, tmp_path_factory):
    return write_variant_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("noisy") / "tiny-noisy", noise=0.05)


def test_fp32_against_itself_is_exactly_zero_and_passes(tiny_checkpoint):
    (result,), corpus = validate_offline(tiny_checkpoint, [VariantSpec.parse(f"hf:{tiny_checkpoint}")], max_tokens=TOKENS)
    m = result.metrics
    assert corpus.predictions == m["predictions"] == TOKENS - len(corpus.windows)
    assert m["ppl_delta"] == 0.0 and m["ppl_delta_rel"] == 0.0
    assert m["kl_mean"] == 0.0 and m["max_logit_diff"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["ppl"] == m["ppl_reference"] > 1.0
    assert result.precision == "fp32"
    assert {g.metric for g in result.gates} == {"ppl_delta_rel", "kl_mean", "top1_agreement"}
    assert result.passed


def test_perturbed_build_fails_the_gate(tiny_checkpoint, noisy_checkpoint):
    (result,), _ = validate_offline(tiny_checkpoint, [VariantSpec.parse(f"hf:{noisy_checkpoint}")], max_tokens=TOKENS)
    assert result.metrics["kl_mean"] > 0 and result.metrics["max_logit_diff"] > 0
    assert not result.passed
    failed = {g.metric: g for g in result.failures}
    assert "top1_agreement" in failed
    assert failed["top1_agreement"].margin > 0
    assert "falls short of >= 0.99 (default fp32) by" in failed["top1_agreement"].describe()


def test_cast_checkpoint_is_gated_at_its_own_precision(tiny_checkpoint, tmp_path):
    bf16 = write_variant_checkpoint(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16")
    (result,), _ = validate_offline(tiny_checkpoint, [VariantSpec.parse(f"hf:{bf16}")], max_tokens=TOKENS)
    assert result.precision == "bf16"
    assert 0 < result.metrics["kl_mean"] < 0.01
    assert all(g.source == "default bf16" for g in result.gates)


def test_gates_direction_and_overrides():
    metrics = {"ppl_delta_rel": 0.03, "kl_mean": 0.02, "top1_agreement": 0.93, "max_logit_diff": 4.0}
    gates = {g.metric: g for g in evaluate_gates(metrics, "fp8")}
    assert all(g.passed for g in gates.values()) and "max_logit_diff" not in gates
    strict = {g.metric: g for g in evaluate_gates(metrics, "fp8", Thresholds(max_ppl_delta=0.01, min_top1_agreement=0.95))}
    assert not strict["ppl_delta_rel"].passed and strict["ppl_delta_rel"].source == "--max-ppl-delta"
    assert math.isclose(strict["ppl_delta_rel"].margin, 0.02)
    assert math.isclose(strict["top1_agreement"].margin, 0.02)
    assert strict["kl_mean"].passed and strict["kl_mean"].source == "default fp8"
    # an online metric the server could not provide is not failed unless asked for
    assert evaluate_gates({"logprob_delta_max": None}, "fp32") == []
    (asked,) = evaluate_gates({"logprob_delta_max": None}, "fp32", Thresholds(max_logprob_delta=0.1))
    assert not asked.passed and "was not measured" in asked.describe()


def test_processed_greedy_log_probs_are_not_compared():
    from trtbuild.quality.accuracy import Generation, Prompt, compare

    tokenizer = load_tokenizer_for_corpus()
    prompts = [Prompt("a", "Hello", 3)]
    reference = [Generation(" world is", [-0.5, -1.2])]
    ties = compare(prompts, reference, [Generation(" world is", [0.0, -math.log(2)])], tokenizer)
    assert ties.logprob_note is not None and ties.as_metrics()["logprob_delta_max"] is None
    real = compare(prompts, reference, [Generation(" world is", [-0.4, -1.5])], tokenizer)
    assert real.logprob_note is None
    assert math.isclose(real.as_metrics()["logprob_delta_max"], 0.3)
    assert real.as_metrics()["exact_match_rate"] == 1.0


def test_shipped_prompts_and_corpus():
    from trtbuild.quality.accuracy import load_prompts

    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) >= 20 and len({p.id for p in prompts}) == len(prompts)
    tokenizer = load_tokenizer_for_corpus()
    corpus = load_corpus(DEFAULT_CORPUS, tokenizer)
    assert 2000 <= corpus.tokens <= 5000
    assert all(len(w) <= 256 for w in corpus.windows)


def load_tokenizer_for_corpus():
    from trtbuild.checkpoint import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


def test_cli_reports_chart_and_compare(tiny_checkpoint, noisy_checkpoint, tmp_path):
    code, out = run(tiny_checkpoint, "--variant", f"hf:{noisy_checkpoint}", "--max-tokens", TOKENS, "--out", tmp_path / "bad")
    assert code == 1, out
    assert "gate failed hf:tiny-noisy: top1_agreement" in out and "by 0." in out
    bad = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert bad["passed"] is False and bad["settings"]["tokens"] == TOKENS
    assert "FAIL" in (tmp_path / "bad" / "report.md").read_text()

    code, out = run(tiny_checkpoint, "--variant", f"hf:{tiny_checkpoint}", "--max-tokens", TOKENS, "--out", tmp_path / "good")
    assert code == 0, out
    assert "all gates pass" in out

    # loosened limits let the noisy build through
    code, out = run(tiny_checkpoint, "--variant", f"hf:{noisy_checkpoint}", "--max-tokens", TOKENS,
                    "--max-kl", 1, "--min-top1-agreement", "50%", "--max-ppl-delta", "20%")
    assert code == 0, out

    code, out = run("--compare", tmp_path / "bad" / "report.json", "--compare", tmp_path / "good" / "report.json",
                    "--out", tmp_path / "cmp")
    assert code == 0, out
    merged = ValidationReport.load(tmp_path / "cmp" / "report.json")
    assert [v.name for v in merged.variants] == ["hf:tiny-noisy", "hf:tiny-llama"]
    assert [v.passed for v in merged.variants] == [False, True]
    assert (tmp_path / "cmp" / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "hf:/no/such/dir"], "/no/such/dir does not exist"),
        (["--variant", "tensorrt:/tmp"], "is not KIND:PATH"),
        ([], "nothing to compare with the checkpoint"),
        (["--variant", "hf:{ckpt}", "--corpus", "/no/corpus.txt"], "corpus /no/corpus.txt does not exist"),
    ],
)
def test_bad_input_is_one_line(tiny_checkpoint, args, message):
    code, out = run(tiny_checkpoint, *[a.format(ckpt=tiny_checkpoint) for a in args])
    assert code == 2 and message in out and "Traceback" not in out


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    code, out = run("--compare", tmp_path / "x.json")
    assert code == 2 and "is not a trtbuild validate report" in out


def test_onnx_export_variant_matches_pytorch(tiny_checkpoint, tmp_path):
    from trtbuild.build.onnx_export import ExportOptions, export_onnx

    export = export_onnx(ExportOptions(tiny_checkpoint, "text-generation-with-past", tmp_path / "onnx")).out
    (result,), _ = validate_offline(tiny_checkpoint, [VariantSpec.parse(f"onnx:{export}")], max_tokens=TOKENS)
    assert result.kind == "onnx" and result.precision == "fp32"  # from export.json
    assert result.metrics["kl_mean"] < 1e-9 and result.metrics["max_logit_diff"] < 1e-3
    assert result.passed


def test_fake_quant_variant_runs_modelopt(tiny_checkpoint):
    (result,), _ = validate_offline(tiny_checkpoint, [VariantSpec.fake_quant("fp8")], max_tokens=TOKENS, calib_samples=2)
    assert result.kind == "fakequant" and result.precision == "fp8"
    assert 0 < result.metrics["kl_mean"] and result.metrics["max_logit_diff"] > 0


@pytest.mark.server
def test_served_greedy_answers_equal_the_reference(tiny_server, tiny_checkpoint, tmp_path):
    code, out = run(tiny_checkpoint, "--server", tiny_server.grpc_url, "--max-new-tokens", 16, "--out", tmp_path / "online")
    assert code == 0, out
    (served,) = json.loads((tmp_path / "online" / "report.json").read_text())["variants"]
    assert served["precision"] == "fp32"  # read from the served model's config
    assert served["metrics"]["exact_match_rate"] == 1.0
    assert served["metrics"]["token_agreement"] == 1.0
    assert served["metrics"]["first_divergence_min"] > 0
    assert all(p["first_divergence"] is None and p["served"] for p in served["details"]["per_prompt"])
    # trtbuild_runtime returns the log-probs of the model's own distribution: they match the reference's
    assert served["details"]["logprob_note"] is None
    assert served["metrics"]["logprob_delta_max"] < 1e-3


# ------------------------------------------------------------------ trained model: meaningful numbers
@pytest.mark.slow
def test_smollm2_bf16_passes_and_damaged_build_fails(smollm2, tmp_path):
    bf16 = write_variant_checkpoint(smollm2, tmp_path / "bf16", dtype="bfloat16")
    damaged = write_variant_checkpoint(smollm2, tmp_path / "damaged", noise=0.05)
    (cast, noisy), corpus = validate_offline(
        smollm2, [VariantSpec.parse(f"hf:{bf16}"), VariantSpec.parse(f"hf:{damaged}")], max_tokens=768
    )
    assert 5 < cast.metrics["ppl_reference"] < 100  # trained (44 on these 768 tokens); random weights score ~50,000
    assert cast.passed, [g.describe() for g in cast.gates]
    assert abs(cast.metrics["ppl_delta_rel"]) < 0.02
    assert not noisy.passed
    assert noisy.metrics["ppl_delta_rel"] > 0.05
