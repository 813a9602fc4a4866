"""bench/README.md's rANS tables are what ``python bench/bench_rans.py`` prints from the JSON."""

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_rans():
    spec = importlib.util.spec_from_file_location("bench_rans", ROOT / "bench" / "bench_rans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_rans_tables_match_the_committed_json():
    results = json.loads((ROOT / "bench/results/rans_cpu-amd-epyc-2core.json").read_text())
    text = _bench_rans().markdown_tables(results)
    tables = re.findall(r"((?:^\|.*\|\n)+)", text + "\n", flags=re.MULTILINE)
    assert len(tables) == 3
    readme = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("<!-- rans:begin -->") : readme.index("<!-- rans:end -->")]
    for table in tables:
        assert table in section, table
    # throughput columns: the reference codes fewer symbols and its column says so
    assert "reference (N = 2,000)" in tables[0]
    row = next(line for line in tables[2].splitlines() if line.startswith("| encode"))
    ours, reference = row.split("|")[2], row.split("|")[-2]
    assert float(ours.strip(" *")) > 1000 * float(reference)
