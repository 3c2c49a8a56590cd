"""``analysis.video_table``: the video methods at 25/15/10% retained, with the time split, on ``digits-video``."""

import pytest

from analysis import video_table
from analysis.video_table import IN_LLM, PRE_LLM, VideoTableConfig, video_methods
from v2drop import Method


def test_video_methods_keep_their_share():
    """Pre-LLM labels run their OneVision preset (the share before layer 0); in-LLM ones average the share."""
    methods, info = video_methods(12, 2048)
    assert list(methods)[0] == "none" and len(methods) == 1 + 3 * len(PRE_LLM + IN_LLM)
    for r in (25, 15, 10):
        for label in PRE_LLM:
            method = methods[f"{label}@{r}%"]
            assert method == Method.from_preset(f"{label}-onevision-{r}").rescaled(12)
            per_layer = method.schedule.tokens_per_layer(12, 2048)
            assert per_layer[0] == 2048 * r // 100
            if label != "holitom":  # HoliTom's presets halve the tokens before layer 18 of 28 (8 of 12)
                assert per_layer == [2048 * r // 100] * 12
        for label in IN_LLM:
            method = methods[f"{label}@{r}%"]
            assert method.scorer_name == label and method.schedule.pre_llm is None
            assert abs(method.schedule.average_tokens(12, 2048) - 2048 * r / 100) < 0.02 * 2048 * r / 100
        assert info[f"vidcom2@{r}%"] == {"retention": r, "scorer": "vidcom2"}
    with pytest.raises(ValueError, match=r"'nothing' has no onevision preset at 25% nor a LLaVA-1.5 preset to fit"):
        video_methods(12, 2048, ("nothing",), (25,))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match=r"--retentions expects whole percents between 1 and 99, got \[0\]"):
        VideoTableConfig(retentions=[0])
    with pytest.raises(
        ValueError, match=r"--methods dart: not a video label; choose from vidcom2, holitom, fastvid, frames"
    ):
        VideoTableConfig(methods=["dart"])


def test_video_table_runs_with_the_time_split(tmp_path):
    rows = video_table.main(
        [
            "--limit", "1", "--retentions", "25", "--methods", "vidcom2", "frames", "--threads", "1",
            "--output", str(tmp_path / "out"), "--store", str(tmp_path / "store"),
        ]
    )  # fmt: skip
    assert [r["method"] for r in rows] == ["none", "vidcom2@25%", "frames@25%"]
    assert [r["entering_llm"] for r in rows] == [2048, 512, 512]
    for row in rows:
        assert all(row[f"{p}_ms"] is not None and row[f"{p}_ms"] >= 0 for p in video_table.TIME_PARTS)
        assert row["vision_ms"] > 0 and row["prefill_ms"] > 0
        assert row["ttft_ms"] == pytest.approx(row["vision_ms"] + row["prefill_ms"])  # one sample: medians add up
    assert rows[1]["scoring_ms"] > 0
    assert (tmp_path / "out" / "video_table.md").read_text().startswith("| retention | method |")
