"""The cost model (FLOPs, KV cache) against hand computation, and measurement context managers."""

import threading

import pytest
import torch

from v2drop import Method, Schedule
from v2drop.cost import PeakMemory, Timer, kv_cache_bytes, layer_flops, mmap_threshold, sample_prefill_flops
from v2drop.tables import write_csv, write_table
from v2drop.testing import batch_for


def test_peak_memory_stops_its_sampler_and_restores_malloc_when_the_body_raises():
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="inside"):
        with PeakMemory("cpu") as memory:
            assert memory.sampling
            if mmap_threshold() is not None:  # glibc: large allocations go to mmap while measuring
                assert mmap_threshold() == 64 * 1024
            raise RuntimeError("inside")
    assert not memory.sampling
    assert {t.ident for t in threading.enumerate()} <= before
    if mmap_threshold() is not None:
        assert mmap_threshold() == 32 * 2**20


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as memory:
        x = torch.ones(64, 2**20)  # 256 MiB
        x += 1
    del x
    assert memory.peak_bytes >= 200 * 2**20


def test_timer_measures_the_body():
    with Timer() as timer:
        sum(range(10**5))
    assert 0 < timer.seconds < 5 and timer.elapsed() >= timer.seconds


@pytest.mark.parametrize("name, layer", [("fastv", 2), ("pdrop", 0)])
def test_sample_flops_count_each_layer_and_the_scorer_by_hand(tiny, name, layer):
    lvlm = tiny("llava")
    prompts, images = batch_for(lvlm, 1, "llava")
    out = lvlm.generate(prompts, images, method=Method(name, schedule=Schedule.one_shot(layer, 0.25)), max_new_tokens=1)
    cfg, n_prompt = lvlm.adapter.text_config, len(out.prompt_ids[0])
    d, m, depth = cfg.hidden_size, cfg.intermediate_size, lvlm.depth
    text = n_prompt - 64
    tokens = [n_prompt] * layer + [text + 16] * (depth - layer)
    scoring = 2.0 * d * d * (n_prompt + 1) + 2.0 * n_prompt * d  # one row over the whole prompt, before any drop
    expected = sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in tokens) + scoring
    assert out.traces[0].vision_tokens == 64
    assert sample_prefill_flops(cfg, out.traces[0], n_prompt, Method(name).scorer) == pytest.approx(expected)
    assert layer_flops(10, d, m) == 4 * 10 * d * d + 2 * 100 * d + 3 * 10 * d * m


def test_kv_cache_bytes_by_hand(tiny):
    cfg = tiny("llava").adapter.text_config  # 2 key/value heads of 64 / 4 = 16 dims
    assert kv_cache_bytes(cfg, [10, 5]) == 15 * 2 * 2 * 16 * 2
    assert kv_cache_bytes(cfg, [10], bytes_per_value=4) == 10 * 2 * 2 * 16 * 4


def test_tables_write_csv_and_markdown(tmp_path):
    rows = [{"method": "a", "x": 0.123456, "n": 3}, {"method": "b", "x": None, "n": 4, "extra": 1}]
    markdown = write_table(rows, tmp_path / "t")
    assert markdown.splitlines() == [
        "| method | x | n | extra |",
        "|---|---|---|---|",
        "| a | 0.1235 | 3 |  |",
        "| b |  | 4 | 1 |",
    ]
    assert (tmp_path / "t.md").read_text() == markdown
    assert (tmp_path / "t.csv").read_text().splitlines() == ["method,x,n,extra", "a,0.123456,3,", "b,,4,1"]
    write_csv(rows, tmp_path / "c.csv", columns=["n"])
    assert (tmp_path / "c.csv").read_text().splitlines() == ["n", "3", "4"]
