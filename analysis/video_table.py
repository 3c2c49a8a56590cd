"""Video methods at the video papers' budgets (25 / 15 / 10% of the vision tokens retained), with the time split.

    python -m analysis.video_table [--model proxy] [--benchmark digits-video] [--limit N] [--retentions 25 10]
        [--methods vidcom2 frames]

Rows: no dropping; the pre-LLM video methods and controls on their own LLaVA-OneVision presets
(``find_presets(label=..., model="onevision", retention=r)``: VidCom2, HoliTom, FastVID, ``frames``,
``frame_pool`` and a pre-LLM ``random``), which keep the share r of every sample's vision tokens before the
first decoder layer (HoliTom and FastVID about r, by their own rounding; HoliTom then merges half of them
inside the LLM, as its presets); and the in-LLM methods FastV and V²Drop on their LLaVA-1.5 presets moved to
the model's depth and fitted so that their average over the decoder layers is the same share
(``budget_method``; they have no video preset). Each evaluation is filed in the run store; columns are the
benchmark's families, accuracy, "avg_vs_none" (as the method table), the vision tokens entering the LLM and
their layer average, and the medians of the time split per sample (``time.vision``: encoder and projector,
``time.scoring``, ``time.prefill``, ``time.decode``, ``time.ttft``) in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.common import (
    PAPER_VISION_TOKENS,
    AnalysisConfig,
    budget_method,
    run_methods,
    setup,
    table_rows,
    write_table,
)
from v2drop.cli import parse_config, run
from v2drop.method import Method

RETENTIONS = (25, 15, 10)  # percent of the vision tokens retained (VidCom2's LLaVA-OV-7B settings)
PRE_LLM = ("vidcom2", "holitom", "fastvid", "frames", "frame_pool", "random")  # labels with OneVision video presets
IN_LLM = ("fastv", "v2drop")  # labels fitted from their LLaVA-1.5 presets to the same average share
VIDEO_MODEL = "onevision"  # the model the video presets are written for
TIME_PARTS = ("vision", "scoring", "prefill", "decode", "ttft")


def video_methods(
    depth: int, n_vision: int, labels=PRE_LLM + IN_LLM, retentions=RETENTIONS
) -> tuple[dict[str, Method], dict[str, dict]]:
    """``{label@r%: Method}`` for none and every label at every retention, and ``{label@r%: {retention, scorer}}``.

    A label of ``PRE_LLM`` runs its ``onevision`` preset of that retention; any other runs its LLaVA-1.5
    preset fitted to an average of ``r%`` of ``n_vision`` tokens over ``depth`` layers. A label with
    neither is an error naming the labels that have them.
    """
    from v2drop.presets import find_presets

    methods, info = {"none": Method.none()}, {"none": {"retention": 100, "scorer": "none"}}
    for r in retentions:
        for label in labels:
            presets = find_presets(label=label, model=VIDEO_MODEL, retention=r / 100)
            if presets:
                method = presets[0].method(depth)
            else:
                method = budget_method(label, r / 100 * PAPER_VISION_TOKENS, depth, n_vision)
            if method is None:
                raise ValueError(
                    f"{label!r} has no {VIDEO_MODEL} preset at {r}% nor a LLaVA-1.5 preset to fit; video labels: "
                    f"{', '.join(PRE_LLM + IN_LLM)}"
                )
            methods[f"{label}@{r}%"] = method
            info[f"{label}@{r}%"] = {"retention": r, "scorer": label}
    return methods, info


def time_columns(result: dict) -> dict:
    """The medians of a result's time split per sample, in milliseconds (``<part>_ms``; None where not measured)."""
    out = {}
    for part in TIME_PARTS:
        median = (result.get("time") or {}).get(part, {}).get("median")
        out[f"{part}_ms"] = None if median is None else 1000.0 * median
    return out


@dataclass
class VideoTableConfig(AnalysisConfig):
    """``analysis.video_table``'s options."""

    benchmark: str = "digits-video"  # a video benchmark
    methods: list[str] | None = None  # labels to run (of PRE_LLM and IN_LLM); None = all
    retentions: list[int] = field(default_factory=lambda: list(RETENTIONS))  # percent of the vision tokens kept

    def __post_init__(self):
        super().__post_init__()
        bad = [r for r in self.retentions if isinstance(r, bool) or not isinstance(r, int) or not 0 < r < 100]
        if bad:
            raise ValueError(f"--retentions expects whole percents between 1 and 99, got {bad}")
        unknown = sorted(set(self.methods or ()) - set(PRE_LLM + IN_LLM))
        if unknown:
            raise ValueError(
                f"--methods {', '.join(unknown)}: not a video label; choose from {', '.join(PRE_LLM + IN_LLM)}"
            )


CONFIG = VideoTableConfig


def main(argv=None) -> list[dict]:
    """Run every video method at every retention and write the table."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(CONFIG, argv, __doc__)
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "video_table")
    labels = tuple(args.methods) if args.methods else PRE_LLM + IN_LLM
    methods, info = video_methods(lvlm.depth, n_vision, labels, args.retentions)
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = table_rows(results, extra=info)
    for row in rows:
        tokens = results[row["method"]].get("tokens") or {}
        row["entering_llm"] = tokens.get("entering_llm")
        row.update(time_columns(results[row["method"]]))
    columns = (
        ["retention", "method"]
        + [f"{benchmark.name}/{f}" for f in sorted(benchmark.families)]
        + ["accuracy", "avg_vs_none", "entering_llm", "avg_vision_tokens"]
        + [f"{p}_ms" for p in TIME_PARTS]
    )
    markdown = write_table(rows, out / "video_table", columns)
    print(
        f"{lvlm.name}: {lvlm.depth} layers, {n_vision} vision tokens, {len(samples)} samples of "
        f"{benchmark.name}/{args.split}"
    )
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
