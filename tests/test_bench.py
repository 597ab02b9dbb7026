"""Smoke test of ``python -m benchmarks.bench``: it runs, and its JSON is complete.

Speed is never asserted here: only that every case ran and that the saved
mask is 1/8 byte per element; and that ``--learnable`` and ``--deploy``
honour the options they accept and refuse, in one line, those they cannot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

# The benchmarks live in benchmarks/ at the repository root (not installed):
# importable with the root on sys.path, as `python -m benchmarks.bench` from the root has it.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _train_step, bench, bench_deploy, bench_learnable  # noqa: E402

# The operator and training-step benchmarks: about half a minute (torch.compile
# and two LMNet steps run inside). The --learnable/--deploy tests are fast.
slow = pytest.mark.slow

# Candidates that must run everywhere; torch.compile may be unavailable (no
# C++ compiler), so composite_compiled may be n/a, but then with its reason.
ALWAYS = ("torch_ext", "relu", "copy", "composite")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--devices", "cpu", "--json", str(path)]) == 0
    with open(path) as f:
        return json.load(f)


@slow
@pytest.mark.timeout(300)
def test_every_candidate_and_op_is_reported(report):
    results = report["results"]
    cases = {(r["dtype"], r["size"]) for r in results}
    assert {dtype for dtype, _ in cases} == {"float32", "bfloat16"}
    for dtype, size in cases:
        for op in bench.OPS:
            got = {r["candidate"]: r for r in results if (r["dtype"], r["size"], r["op"]) == (dtype, size, op)}
            assert set(got) == set(bench.CANDIDATES), (dtype, size, op)
            for name, r in got.items():
                assert r["device"] == "cpu"
                if r["status"] == "ok":
                    assert r["median_s"] > 0 and r["min_s"] > 0, r
                    assert r["gbps"] > 0, r
                    assert r["samples_s"] and all(t > 0 for t in r["samples_s"]), r
                    assert r["saved_bytes_per_element"] >= 0, r
                else:
                    assert r["status"] == "n/a" and r["reason"], r
                    assert name not in ALWAYS, r
            ext = got["torch_ext"]
            for r in got.values():
                if r["status"] == "ok":
                    assert r["torch_ext_ratio"] == pytest.approx(ext["median_s"] / r["median_s"])


@slow
@pytest.mark.timeout(300)
def test_saved_bytes_per_element(report):
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        element = 4 if r["dtype"] == "float32" else 2
        if r["candidate"] == "torch_ext":
            # The 1-bit packed mask: exactly 1/8 byte an element.
            assert r["saved_bytes_per_element"] == 0.125, r
            expected = {"forward": 2 * element + 0.125, "backward": 2 * element + 0.125}
            expected["forward+backward"] = expected["forward"] + expected["backward"]
            assert r["bytes_per_element"] == expected[r["op"]], r
        elif r["candidate"] == "relu":
            assert r["saved_bytes_per_element"] == element, r  # relu saves its output
        elif r["candidate"] == "composite":
            assert r["saved_bytes_per_element"] == element, r  # the hand-written STE saves x
        elif r["candidate"] == "copy":
            assert r["saved_bytes_per_element"] == 0, r


@slow
@pytest.mark.timeout(300)
def test_copy_bandwidth_and_train_step(report):
    assert report["copy_bandwidth_gbps"]["cpu"] > 0
    (train,) = report["train_step"]
    assert train["device"] == "cpu" and train["batch"] > 0
    assert set(train["median_s"]) == {"LmnetV1Quantize", "LmnetV1"}
    assert all(t > 0 for t in train["median_s"].values())
    assert train["ratio_quantized_over_float"] > 0


@slow
@pytest.mark.timeout(300)
def test_channels_last_rows_and_the_amp_channels_last_training_step(tmp_path):
    path = tmp_path / "cl.json"
    assert bench.main(["--quick", "--devices", "cpu", "--dtypes", "float32", "--layouts", "contiguous,channels_last",
                       "--no-compile", "--train-amp", "bfloat16", "--train-channels-last", "--json", str(path)]) == 0
    with open(path) as f:
        doc = json.load(f)
    rows = doc["results"]
    assert {r["layout"] for r in rows} == {"contiguous", "channels_last"}
    assert "composite_compiled" not in {r["candidate"] for r in rows}
    for layout in ("contiguous", "channels_last"):
        ours = [r for r in rows if r["layout"] == layout and r["candidate"] == "torch_ext"]
        assert {r["op"] for r in ours} == set(bench.OPS) and all(r["status"] == "ok" for r in ours)
    (step,) = doc["train_step"]
    assert step["amp"] == "bfloat16" and step["channels_last"] is True and step["ratio_quantized_over_float"] > 0
    assert "targets" in doc  # the final document, not a partial one


@slow
@pytest.mark.timeout(300)
def test_resnet_like_training_step(tmp_path):
    """--train-models: LmResnet with QuantActivation (float weights) against LmResnet, as gpu_check.sh runs it."""
    path = tmp_path / "resnet.json"
    assert bench.main(["--quick", "--devices", "cpu", "--only-train-step", "--train-models", "lmnet_v1,lm_resnet",
                       "--train-channels-last", "--train-amp", "bfloat16", "--json", str(path)]) == 0
    with open(path) as f:
        doc = json.load(f)
    steps = {t["model"]: t for t in doc["train_step"]}
    assert set(steps) == set(bench.TRAIN_MODELS)
    resnet = steps["lm_resnet"]
    assert (resnet["quantized"], resnet["float"]) == ("LmResnet+QuantActivation", "LmResnet")
    assert set(resnet["median_s"]) == {"LmResnet+QuantActivation", "LmResnet"}
    assert resnet["channels_last"] is True and resnet["ratio_quantized_over_float"] > 0
    assert set(steps["lmnet_v1"]["median_s"]) == {"LmnetV1Quantize", "LmnetV1"}


def test_the_resnet_pair_differs_only_in_its_activations():
    from torch_ext import QuantActivation

    quantized, float_twin = _train_step.train_pair("lm_resnet").values()
    q, f = quantized(), float_twin()
    assert [n for n, _ in q.named_parameters()] == [n for n, _ in f.named_parameters()]
    assert any(isinstance(m, QuantActivation) for m in q.modules())
    assert not any(isinstance(m, QuantActivation) for m in f.modules())
    # Float weights: the same parameters give the same convolutions.
    q.load_state_dict(f.state_dict())
    convs_q = [m for m in q.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(1, 64, 8, 8)
    for cq, cf in zip(convs_q, [m for m in f.modules() if isinstance(m, torch.nn.Conv2d)]):
        if cq.in_channels == 64:
            assert torch.equal(cq(x), cf(x))


def test_bad_options_are_refused():
    with pytest.raises(SystemExit, match="--train-models: unknown value 'resnet18'"):
        bench.main(["--train-models", "resnet18"])
    with pytest.raises(SystemExit, match="--layouts: unknown value 'nhwc'"):
        bench.main(["--layouts", "nhwc"])
    with pytest.raises(SystemExit, match="channels_last cases need multiples of 65536"):
        bench.main(["--layouts", "channels_last", "--sizes", "1000"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--devices cuda: no CUDA device is visible"):
            bench.main(["--devices", "cuda"])


# --------------------------------------------------------------------------
# --learnable (benchmarks.bench_learnable) and --deploy (benchmarks.bench_deploy).


@pytest.fixture
def keep_threads():
    """The benchmarks set torch's thread count: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _headers(text):
    return [line for line in text.splitlines() if line.startswith("forward+backward, ")]


def _check_records(records, device, size, dtype):
    got = {r["row"]: r for r in records if (r["device"], r["size"], r["dtype"]) == (device, size, dtype)}
    assert set(got) == set(bench_learnable.ROWS), (device, size, dtype)
    fixed, relu = got["fixed"]["ms"], got["relu"]["ms"]
    for row, r in got.items():
        if r["status"] != "ok":
            # torch's learnable fake-quantize may lack a dtype; then it says why.
            assert row == "torch_fq" and r["reason"], r
            continue
        assert r["ms"] > 0 and r["min_ms"] > 0 and r["samples_ms"], r
        assert r["ratio_to_fixed"] == pytest.approx(r["ms"] / fixed), r
        assert r["ratio_to_relu"] == pytest.approx(r["ms"] / relu), r
    assert got["fixed"]["ratio_to_fixed"] == 1.0
    return got


def test_learnable_honours_devices_sizes_dtypes_repeats_threads_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "learnable.json"
    assert bench.main(["--learnable", "--devices", "cpu", "--sizes", "64K,128K", "--repeats", "1", "--warmup", "0",
                       "--threads", "1", "--dtypes", "float32,bfloat16", "--json", str(path)]) == 0
    headers = _headers(capsys.readouterr().out)
    assert len(headers) == 4, headers  # one per dtype and size
    for dtype in ("float32", "bfloat16"):
        for size, name in ((65536, "64K"), (131072, "128K")):
            (h,) = [h for h in headers if f"{name} ({size}) {dtype} elements" in h]
            assert ", cpu, 1 threads, median of 1 interleaved rounds (warm-up 0)" in h, h
    with open(path) as f:
        doc = json.load(f)
    assert doc["meta"]["threads"] == 1 and doc["meta"]["repeats"] == 1 and doc["meta"]["warmup"] == 0
    records = doc["results"]
    assert len(records) == 2 * 2 * len(bench_learnable.ROWS)
    for dtype in ("float32", "bfloat16"):
        for size in (65536, 131072):
            got = _check_records(records, "cpu", size, dtype)
            assert all(r["repeats"] == 1 and len(r["samples_ms"]) == 1 for r in got.values() if r["status"] == "ok")


def test_learnable_quick_and_its_printed_ratios(capsys, keep_threads):
    assert bench.main(["--learnable", "--quick", "--devices", "cpu", "--dtypes", "bfloat16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    (h,) = _headers(out)
    assert "64K (65536) bfloat16 elements" in h and "1 threads, median of 3 interleaved rounds (warm-up 1)" in h, h
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ")}
    assert set(rows) == set(bench_learnable.ROWS)
    for row in ("fixed", "pact", "lsq"):
        assert "x fixed" in rows[row] and "x relu" in rows[row], rows[row]
    assert "x fixed" in rows["relu"] and "x relu" not in rows["relu"]


@pytest.mark.parametrize("options, named", [
    (["--layouts", "channels_last"], "--layouts channels_last"),
    (["--layouts", "contiguous,channels_last"], "--layouts channels_last"),
    (["--train-batch", "4"], "--train-batch"),
    (["--train-repeats", "2"], "--train-repeats"),
    (["--train-amp", "bfloat16"], "--train-amp"),
    (["--train-channels-last"], "--train-channels-last"),
    (["--train-models", "lm_resnet"], "--train-models"),
    (["--no-train-step"], "--train-step/--no-train-step"),
    (["--only-train-step"], "--only-train-step"),
    (["--dtypes", "float16"], "--dtypes float16"),
    (["--deploy"], "--deploy"),
])
def test_learnable_refuses_what_it_cannot_honour(options, named):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--learnable", "--sizes", "64K", "--repeats", "1"] + options)
    message = str(exc.value.code)
    assert message.startswith(f"--learnable: cannot honour {named}: "), message
    assert "\n" not in message


def test_a_refused_option_is_one_line_and_a_nonzero_exit():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--learnable", "--sizes", "64K",
                           "--train-batch", "4"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip() == "--learnable: cannot honour --train-batch: it times no training step"


def test_deploy_forwards_threads_repeats_json(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_deploy, "main", lambda argv=None: calls.append(list(argv)) or {})
    path = str(tmp_path / "deploy.json")
    assert bench.main(["--deploy", "--repeats", "2", "--threads", "1", "--json", path, "--devices", "cpu"]) == 0
    assert bench.main(["--deploy"]) == 0
    assert calls == [["--threads", "1", "--repeats", "2", "--json", path], []]


@pytest.mark.parametrize("options, named", [
    (["--sizes", "64K"], "--sizes"),
    (["--warmup", "1"], "--warmup"),
    (["--dtypes", "float32"], "--dtypes"),
    (["--layouts", "contiguous"], "--layouts"),
    (["--quick"], "--quick"),
    (["--devices", "cpu,cuda"], "--devices cuda"),
    (["--train-batch", "4"], "--train-batch"),
])
def test_deploy_refuses_what_it_cannot_honour(monkeypatch, options, named):
    monkeypatch.setattr(bench_deploy, "main", lambda argv=None: pytest.fail("ran despite a refused option"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--deploy"] + options)
    message = str(exc.value.code)
    assert message.startswith(f"--deploy: cannot honour {named}: "), message
    assert "\n" not in message


def test_bench_learnable_cli_bfloat16_and_json(tmp_path, capsys, keep_threads):
    path = tmp_path / "bl.json"
    medians = bench_learnable.main(["--numel", "64K", "--repeats", "1", "--threads", "1", "--dtype", "bfloat16",
                                    "--json", str(path)])
    (h,) = _headers(capsys.readouterr().out)
    assert "64K (65536) bfloat16 elements, bit=2, cpu, 1 threads, median of 1 interleaved rounds" in h, h
    with open(path) as f:
        records = json.load(f)["results"]
    assert len(records) == len(bench_learnable.ROWS)
    got = _check_records(records, "cpu", 65536, "bfloat16")
    assert medians == {row: r["ms"] for row, r in got.items() if r["status"] == "ok"}
    assert {"fixed", "pact", "lsq", "relu", "copy"} <= set(medians)


def test_bench_learnable_defaults_are_unchanged(monkeypatch, keep_threads):
    """The own CLI's defaults (16M float32 elements, 2 threads, 15 rounds, cpu), without running them."""
    seen = {}

    def fake_benchmark(devices, sizes, dtypes, repeats, warmup, threads, bit, json_path, **kw):
        seen.update(devices=devices, sizes=sizes, dtypes=dtypes, repeats=repeats, threads=threads, bit=bit)
        return {"results": []}

    monkeypatch.setattr(bench_learnable, "benchmark", fake_benchmark)
    assert bench_learnable.main([]) == {}
    assert seen == {"devices": ["cpu"], "sizes": [1 << 24], "dtypes": ["float32"], "repeats": 15, "threads": 2,
                    "bit": 2}


# --------------------------------------------------------------------------
# The deploy benchmark (benchmarks/bench_deploy.py) and how the benchmarks are run.


@pytest.mark.slow  # exports and times every candidate (about 13 s)
def test_deploy_bench_runs_and_reports_every_candidate(keep_threads):
    import io

    text = io.StringIO()
    result = bench_deploy.run(batch_sizes=(2,), threads=1, repeats=1, out=text, onnx=False)
    rows = result["batches"]["2"]
    assert sorted(rows) == ["deployed", "deployed_aoti", "deployed_exported", "deployed_script", "float_lmnet",
                            "w1a2_pytorch"]
    assert all(r["seconds"] > 0 for r in rows.values())
    assert [layer["layer"] for layer in result["layers"]["2"]] == ["conv2.act", "conv3.act", "conv4.act",
                                                                    "conv5.act", "stage9"]
    assert result["weight_bytes"]["float_lmnet"] >= 25 * result["weight_bytes"]["deployed"]
    assert "float/this" in text.getvalue() and "Gbop/s" in text.getvalue()


@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--repeats", "0"), ("--batch-sizes", "-1")])
def test_deploy_bench_refuses_a_bad_count_naming_it(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be >= 1, got {value}$"):
        bench_deploy.main([option, value])


@pytest.mark.parametrize("text, why", [("12Q", "size must be a number with an optional K/M/G suffix, got '12Q'"),
                                       ("0", "size must be positive, got '0'")])
def test_a_bad_size_is_refused_naming_it(capsys, text, why):
    assert bench._parser().parse_args(["--sizes", "64K,16M,1000"]).sizes == [65536, 1 << 24, 1000]
    with pytest.raises(SystemExit):
        bench._parser().parse_args(["--sizes", text])
    assert f"argument --sizes: {why}" in capsys.readouterr().err


def test_run_as_a_file_says_how_to_run_it():
    """The one documented form is `python -m benchmarks.bench` from the root; a file run says so, in one line."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--help"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == "run it from the repository root as a module: python -m benchmarks.bench"
