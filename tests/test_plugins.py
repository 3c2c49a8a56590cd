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


# -- a module dropped into v2drop/scorers or v2drop/benchmarks registers with no other step ----------------

NORM_MODULE = '''
from dataclasses import dataclass

from v2drop import LayerState, Scorer, register_scorer


@register_scorer("norm")
@dataclass
class NormScorer(Scorer):
    """Keep the vision tokens with the largest hidden-state norm."""

    ord: float = 2.0

    def score(self, state: LayerState):
        return state.hidden.float().norm(p=self.ord, dim=-1).gather(1, state.vision_idx)
'''

TALLY_MODULE = '''
from v2drop.benchmarks.base import Benchmark, register_benchmark


@register_benchmark("tally")
class Tally(Benchmark):
    """A benchmark with nothing in it."""

    splits = ("test",)
    default_split = "test"
'''


@pytest.fixture
def extra_modules(tmp_path, monkeypatch):
    """``extra_modules(package, name, source)``: a module of ``package`` living in a temporary folder.

    The folder joins the real package's ``__path__`` (where ``import`` and ``pkgutil`` look), so the
    registry's own discovery finds it; the module, the path and the registrations are undone afterwards.
    """
    import importlib

    added = []

    def add(package: str, name: str, source: str, registry) -> None:
        folder = tmp_path / package
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(source)
        pkg = importlib.import_module(package)
        monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(folder)])
        monkeypatch.setattr(registry, "_discovered", False)  # discover again, as a fresh process would
        added.append(f"{package}.{name}")

    yield add
    for module in added:
        sys.modules.pop(module, None)


def test_a_scorer_module_in_the_package_is_registered_without_being_listed(extra_modules):
    import v2drop
    from v2drop.scorers import SCORERS

    assert "norm" not in v2drop.list_scorers()
    extra_modules("v2drop.scorers", "norm", NORM_MODULE, SCORERS)
    assert "norm" in v2drop.list_scorers() and "v2drop" in v2drop.list_scorers()
    scorer = v2drop.build_scorer("norm", ord=1.0)
    assert type(scorer).__module__ == "v2drop.scorers.norm" and scorer.ord == 1.0
    assert v2drop.Method.from_dict(v2drop.Method("norm").to_dict()).scorer == v2drop.build_scorer("norm")


def test_a_module_that_fails_to_import_fails_every_lookup(extra_modules):
    import v2drop
    from v2drop.scorers import SCORERS

    extra_modules("v2drop.scorers", "broken", "raise RuntimeError('this scorer module is broken')\n", SCORERS)
    for _ in range(2):  # not only the first lookup: a half-filled registry is never served
        with pytest.raises(RuntimeError, match="this scorer module is broken"):
            v2drop.list_scorers()


def test_a_benchmark_module_in_the_package_is_registered_without_being_listed(extra_modules):
    from v2drop.benchmarks import BENCHMARKS, get_benchmark, list_benchmarks

    assert "tally" not in list_benchmarks()
    extra_modules("v2drop.benchmarks", "tally", TALLY_MODULE, BENCHMARKS)
    assert "tally" in list_benchmarks() and "pope" in list_benchmarks()
    assert type(get_benchmark("tally")).__module__ == "v2drop.benchmarks.tally"


def test_discovery_imports_every_module_in_name_order(tmp_path, monkeypatch):
    from v2drop.registry import import_modules

    pkg = tmp_path / "discovered_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("ORDER = []\n")
    for name in ("zeta", "alpha", "mid"):
        (pkg / f"{name}.py").write_text(f"import discovered_pkg\ndiscovered_pkg.ORDER.append({name!r})\n")
    (pkg / "sub" / "__init__.py").write_text("raise RuntimeError('subpackages are not entered')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        names = import_modules("discovered_pkg")
        assert names == ["discovered_pkg.alpha", "discovered_pkg.mid", "discovered_pkg.zeta"]
        assert sys.modules["discovered_pkg"].ORDER == ["alpha", "mid", "zeta"]
        assert import_modules("discovered_pkg") == names and sys.modules["discovered_pkg"].ORDER == [
            "alpha",
            "mid",
            "zeta",
        ]
    finally:
        for module in [m for m in sys.modules if m == "discovered_pkg" or m.startswith("discovered_pkg.")]:
            del sys.modules[module]


@pytest.mark.slow
@pytest.mark.integration
def test_a_scorer_module_in_the_package_runs_through_the_contract_suite(tmp_path):
    """The contract suite, run in a fresh process whose v2drop.scorers holds one more module, checks it too."""
    import ast

    (tmp_path / "norm.py").write_text(NORM_MODULE)
    contract = ROOT / "tests" / "test_scorer_contract.py"
    checks = {
        n.name
        for n in ast.parse(contract.read_text()).body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }
    code = textwrap.dedent(f"""
        import sys
        import pytest
        import v2drop.scorers

        v2drop.scorers.__path__.append({str(tmp_path)!r})

        class Passed:
            nodes = []

            def pytest_runtest_logreport(self, report):
                if report.when == "call" and report.passed:
                    self.nodes.append(report.nodeid)

        passed = Passed()
        code = pytest.main(["-q", "-p", "no:cacheprovider", {str(contract)!r}, "-k", "norm"], plugins=[passed])
        print("PASSED", *passed.nodes)
        sys.exit(code)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    nodes = out.stdout.strip().splitlines()[-1].split()[1:]
    assert all("norm" in n for n in nodes)
    assert {n.split("::")[1].split("[")[0] for n in nodes} == checks
