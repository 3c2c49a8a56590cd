"""Third-party scorers arrive through the ``v2drop.scorers`` entry-point group."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_entry_point_scorer_is_discovered(tmp_path):
    pkg = tmp_path / "thirdparty_scorer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent('''
        from dataclasses import dataclass
        from v2drop import Scorer

        @dataclass
        class ThirdScorer(Scorer):
            """Keep the first tokens."""
            bias: float = 0.0

            def score(self, state):
                return -state.vision_idx.float() + self.bias
    ''')
    )
    dist = tmp_path / "thirdparty_scorer-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-scorer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[v2drop.scorers]\nthird = thirdparty_scorer:ThirdScorer\n")
    code = "import v2drop; print(v2drop.list_scorers()); print(v2drop.build_scorer('third', bias=1.5))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": ""},
        capture_output=True,
        text=True,
        cwd=str(tmp_path.parent),
    )
    assert out.returncode == 0, out.stderr
    names, built = out.stdout.splitlines()
    assert "'third'" in names and "'v2drop'" in names
    assert built == "ThirdScorer(bias=1.5)"
