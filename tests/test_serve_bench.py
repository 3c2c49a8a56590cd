"""experiments.serve_bench's parts that run without vLLM: the per-image budget note and the table it goes into."""

from __future__ import annotations

from v2drop import Method
from v2drop.benchmarks import Sample, get_benchmark


def test_a_pre_llm_budget_on_several_images_is_noted_in_the_table():
    """Prompts with two images: a pre-LLM method's budget is per image in the plugin, per sample in the engine, and the
    table says so under the method; one image per prompt, or decoder stages only, need no note."""
    from experiments.serve_bench import budget_note, format_table

    one = get_benchmark("digits").load("test", 2)
    two = [Sample(s.id, s.question, s.answer, s.family, (s.images[0], s.images[0])) for s in one]
    divprune, v2drop = Method.from_preset("divprune-llava15-64"), Method.from_preset("v2drop-llava15-128")
    assert budget_note(divprune, one) is None
    assert budget_note(v2drop, two) is None and budget_note(Method.resolve("none"), two) is None
    note = budget_note(divprune, two)
    assert note.startswith("up to 2 images per prompt: the plugin's pre-LLM budget is per image")
    figures = {"requests_per_s": 1.0, "output_tokens_per_s": 2.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2}
    figures |= {"accuracy": 0.5, "agreement_with_engine": 0.5, "prompt_tokens_mean": 90.0}
    figures |= {"tower_ms_per_image": 1.0, "prune_ms_per_image": 0.5, "torch_threads": 2}
    out = {
        "command": "python -m experiments.serve_bench",
        "config": {"server": False},
        "environment": {
            "processor": "x86_64",
            "cpu_count": 2,
            "omp_num_threads": "2",
            "torch": "2.13.0",
            "transformers": "5",
            "vllm": "0.32.0",
            "load_average_at_start": 0.1,
        },
        "wall_seconds": 1.0,
        "methods": {"divprune-llava15-64": {"supported": True, **figures, "budget_note": note}},
    }
    table = format_table(out)
    assert f"- divprune-llava15-64: {note}" in table and "| divprune-llava15-64 | 1 |" in table
