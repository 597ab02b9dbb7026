"""Smoke test of ``python -m torch_ext.bench``: it runs, and its JSON is complete.

Speed is never asserted here: only that every case ran and that the saved
mask is 1/8 byte per element.
"""

import json

import pytest

torch = pytest.importorskip("torch")
bench = pytest.importorskip("torch_ext.bench")

# About half a minute (torch.compile and two LMNet steps run inside).
pytestmark = pytest.mark.slow

# Candidates that must run everywhere; torch.compile may be unavailable (no
# C++ compiler), so composite_compiled may be n/a, but then with its reason.
ALWAYS = ("torch_ext", "relu", "copy", "composite")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--quick", "--devices", "cpu", "--json", str(path)]) == 0
    with open(path) as f:
        return json.load(f)


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


@pytest.mark.timeout(300)
def test_copy_bandwidth_and_train_step(report):
    assert report["copy_bandwidth_gbps"]["cpu"] > 0
    (train,) = report["train_step"]
    assert train["device"] == "cpu" and train["batch"] > 0
    assert set(train["median_s"]) == {"LmnetV1Quantize", "LmnetV1"}
    assert all(t > 0 for t in train["median_s"].values())
    assert train["ratio_quantized_over_float"] > 0


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

    quantized, float_twin = bench._train_pair("lm_resnet").values()
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
