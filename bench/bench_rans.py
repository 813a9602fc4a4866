"""rANS coder benchmarks: ours vs constriction, torchac and the eager Python reference.

Run: ``python -m pytest bench/bench_rans.py --benchmark-only``
(``--benchmark-json bench/results/rans_<machine>.json`` to keep the numbers).

Scenarios (issue 2):
  (a) float probabilities (N, K) in, bytes out; encode and decode timed separately.
  (b) precomputed integer CDFs (N, K + 1) in.
  (c) 64 static CDF tables of K = 256 and a per-symbol table index.
  (d) framing: the fixed cost of a stream (bytes above the ideal code length of its
      quantised frequencies) in the standard and the compact framing, from 1 to 2^20 symbols.
Each result's ``extra_info`` has N, K, symbols/s (``msym_per_s``, millions) and the size
overhead vs. the ideal ``-sum log2 p`` in percent. Peers are skipped when not installed
(``pip install constriction torchac``). Input conversions a peer needs (float or int16
CDFs for torchac, per-table models for constriction in (c)) are done outside the timed
region, which flatters the peers slightly.

Sizes: the issue's N (2^20 for (a)/(b), 2^22 for (c)); at K = 1024 that is 4 GiB of float32
probabilities (and 4 GiB more of CDFs for (b) and torchac), so the machine needs ~10 GiB free.
constriction is given the same float32 probabilities as ours: it reads them directly and
encodes faster from them than from float64.
``PQMIM_BENCH_N_A`` and ``PQMIM_BENCH_N_C`` override them; the eager reference always runs
on ``REF_N`` symbols (throughput is per symbol, so N only needs to be large enough to
amortise call overhead). The N used is recorded in every result. ``PQMIM_BENCH_NOTE`` is
stored with every result (e.g. whether the machine was otherwise idle).

Peers in (c): torchac needs one CDF per symbol, gathered from the tables inside the timed
region (its only way to take them). constriction has no indexed API; it gets one fixed model
per table and the symbols grouped by table, the grouping (stable argsort of the indexes,
gather, and the scatter back on decode) timed as part of its work ("constriction") and, to
show its raw coding speed, done outside the timed region ("constriction_pregrouped").

Compare providers by throughput, not by pytest-benchmark's time columns: those are seconds per
call, and the calls code different N (the eager reference codes ``REF_N`` = 2,000 symbols, so
it "wins" every time ranking). After a run this file prints each group's M symbols/s, best
first; ``python bench/bench_rans.py RESULTS.json`` prints the Markdown tables of
``bench/README.md`` from a saved ``--benchmark-json`` file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform

import numpy as np
import pytest

from pqmim_kernels import coding
from pqmim_kernels.reference import rans as ref

REF_N = 2000
_RESULTS: list[dict] = []  # one row per benchmark run here, for the throughput summary
THREADS = os.cpu_count() or 1
HAVE = {m: importlib.util.find_spec(m) is not None for m in ("constriction", "torchac")}


def n_a(k: int) -> int:
    env = os.environ.get("PQMIM_BENCH_N_A")
    return int(env) if env else 1 << 20


N_C = int(os.environ.get("PQMIM_BENCH_N_C", 1 << 22))


@functools.lru_cache(maxsize=1)
def case_a(k: int, n: int):
    """Softmax rows of Gaussian logits (std 2) and a symbol sampled from each (float32)."""
    rng = np.random.default_rng(k)
    probs = np.empty((n, k), np.float32)
    symbols = np.empty(n, np.int64)
    ideal = 0.0
    for lo in range(0, n, 1 << 14):  # chunked to bound temporaries
        lg = rng.normal(size=(min(n - lo, 1 << 14), k)) * 2.0
        e = np.exp(lg - lg.max(axis=1, keepdims=True))
        q = e / e.sum(axis=1, keepdims=True)
        probs[lo : lo + len(q)] = q
        c = np.cumsum(q, axis=1)
        s = np.minimum((rng.random(len(q))[:, None] > c).sum(axis=1), k - 1)
        symbols[lo : lo + len(q)] = s
        ideal -= np.log2(q[np.arange(len(q)), s]).sum()
    return probs, symbols, ideal


@functools.lru_cache(maxsize=1)
def case_c(n: int, tables: int = 64, k: int = 256):
    """64 static tables (discretised Gaussians of different widths) and indexes into them."""
    rng = np.random.default_rng(0)
    x = np.arange(k) - k / 2
    widths = np.geomspace(0.5, 40.0, tables)
    pt = np.exp(-0.5 * (x[None, :] / widths[:, None]) ** 2).astype(np.float32) + 1e-6
    table = coding.quantize_probs(pt, 16)
    indexes = rng.integers(0, tables, n)
    cdf = table.astype(np.float64) / 2**16
    u = rng.random(n)
    symbols = np.empty(n, np.int64)
    for t in range(tables):  # inverse-CDF sampling, table by table
        sel = indexes == t
        symbols[sel] = np.searchsorted(cdf[t], u[sel], side="right") - 1
    pdf = np.diff(cdf, axis=1)
    ideal = -np.log2(pdf[indexes, symbols]).sum()
    return table, indexes, symbols, ideal


def record(benchmark, scenario, provider, op, n, k, nbytes=None, ideal=None, **extra):
    benchmark.extra_info.update(
        scenario=scenario,
        provider=provider,
        op=op,
        N=n,
        K=k,
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus",
        note=os.environ.get("PQMIM_BENCH_NOTE", ""),
        **extra,
    )
    if nbytes is not None and ideal is not None:
        benchmark.extra_info["bytes"] = int(nbytes)
        benchmark.extra_info["overhead_pct"] = 100.0 * (8 * nbytes - ideal) / ideal
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["msym_per_s"] = n / mean / 1e6
    _RESULTS.append(
        {"group": benchmark.group, "provider": provider, "N": n, "mean_s": mean,
         "msym_per_s": n / mean / 1e6}
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _throughput_summary(request):
    """After this file's benchmarks: M symbols/s per group, best first (like with like)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _RESULTS:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_sep("-", "rANS throughput (M symbols/s; each provider's own N)")
        for group in dict.fromkeys(r["group"] for r in _RESULTS):
            rows = sorted(
                (r for r in _RESULTS if r["group"] == group), key=lambda r: -r["msym_per_s"]
            )
            reporter.write_line(group)
            for r in rows:
                reporter.write_line(
                    f"  {r['provider']:<24} {r['msym_per_s']:>9.2f} M sym/s   "
                    f"N = {r['N']:>9,}   {1e3 * r['mean_s']:>10.2f} ms per call"
                )
    _RESULTS.clear()


def run(benchmark, fn, heavy=True):
    if heavy:
        return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


PROVIDERS_A = ["ours", "ours_mt", "constriction", "torchac", "reference"]
CASES_A = [(k, p, op) for k in (256, 1024) for p in PROVIDERS_A for op in ("encode", "decode")]


@pytest.mark.parametrize("k,provider,op", CASES_A)
def bench_a_probs(benchmark, k, provider, op):
    benchmark.group = f"(a) float probs K={k} {op}"
    if provider in HAVE and not HAVE[provider]:
        pytest.skip(f"{provider} is not installed")
    n = REF_N if provider == "reference" else n_a(k)
    probs, symbols, ideal = case_a(k, n_a(k))
    probs, symbols = probs[:n], symbols[:n]
    if n != n_a(k):
        q = probs.astype(np.float64)
        ideal = -np.log2((q / q.sum(1, keepdims=True))[np.arange(n), symbols]).sum()
    extra = {}
    if provider in ("ours", "ours_mt"):
        threads = THREADS if provider == "ours_mt" else 1
        extra["threads"] = threads
        enc = functools.partial(coding.encode_probs, symbols, probs, num_threads=threads)
        data = enc()
        dec = functools.partial(coding.decode_probs, data, probs, num_threads=threads)
        nbytes = len(data)
    elif provider == "constriction":
        import constriction

        model = constriction.stream.model.Categorical(perfect=False)
        s32 = symbols.astype(np.int32)
        extra["note_inputs"] = "the same float32 probs (its faster input; float64 is slower)"

        def enc():
            c = constriction.stream.stack.AnsCoder()
            c.encode_reverse(s32, model, probs)
            return c.get_compressed()

        comp = enc()
        nbytes = comp.nbytes

        def dec():
            return constriction.stream.stack.AnsCoder(comp).decode(model, probs)
    elif provider == "torchac":
        import torch
        import torchac

        cdf = torch.zeros((n, k + 1), dtype=torch.float32)
        torch.cumsum(torch.from_numpy(probs), dim=1, out=cdf[:, 1:])
        sym16 = torch.from_numpy(symbols).short()
        extra["note_inputs"] = "float CDFs (cumsum) prepared outside the timed region"
        if k > 1 << 15:
            pytest.skip("torchac takes int16 symbols")

        def enc():
            return torchac.encode_float_cdf(cdf, sym16)

        data = enc()
        nbytes = len(data)

        def dec():
            return torchac.decode_float_cdf(cdf, data)
    else:
        e = ref.RansEncoder()
        e.encode_probs(symbols, probs)
        data = e.finish()
        nbytes = len(data)

        def enc():
            e = ref.RansEncoder()
            e.encode_probs(symbols, probs)
            return e.finish()

        def dec():
            d = ref.RansDecoder(data)
            out = d.decode_probs(probs)
            d.finish()
            return out

    out = run(benchmark, enc if op == "encode" else dec, heavy=provider != "reference")
    if op == "decode":
        assert np.array_equal(np.asarray(out).astype(np.int64), symbols)
    record(benchmark, "a", provider, op, n, k, nbytes, ideal, **extra)


PROVIDERS_B = ["ours", "torchac", "reference"]
CASES_B = [(k, p, op) for k in (256, 1024) for p in PROVIDERS_B for op in ("encode", "decode")]


@pytest.mark.parametrize("k,provider,op", CASES_B)
def bench_b_cdfs(benchmark, k, provider, op):
    benchmark.group = f"(b) integer CDFs K={k} {op}"
    if provider in HAVE and not HAVE[provider]:
        pytest.skip(f"{provider} is not installed")
    n = REF_N if provider == "reference" else n_a(k)
    probs, symbols, ideal = case_a(k, n_a(k))
    probs, symbols = probs[:n], symbols[:n]
    if n != n_a(k):
        q = probs.astype(np.float64)
        ideal = -np.log2((q / q.sum(1, keepdims=True))[np.arange(n), symbols]).sum()
    extra = {}
    if provider == "torchac":
        import torch
        import torchac
        from torchac.torchac import _convert_to_int_and_normalize

        cdf = torch.zeros((n, k + 1), dtype=torch.float32)
        torch.cumsum(torch.from_numpy(probs), dim=1, out=cdf[:, 1:])
        cdf16 = _convert_to_int_and_normalize(cdf, True)
        del cdf
        sym16 = torch.from_numpy(symbols).short()
        extra["note_inputs"] = "torchac's own int16 CDFs (16-bit precision)"

        def enc():
            return torchac.encode_int16_normalized_cdf(cdf16, sym16)

        data = enc()

        def dec():
            return torchac.decode_int16_normalized_cdf(cdf16, data)
    else:
        cdfs = coding.quantize_probs(probs, num_threads=THREADS)
        codec = ref if provider == "reference" else coding

        def enc():
            e = codec.RansEncoder()
            e.encode_cdfs(symbols, cdfs)
            return e.finish()

        data = enc()

        def dec():
            d = codec.RansDecoder(data)
            out = d.decode_cdfs(cdfs)
            d.finish()
            return out

    out = run(benchmark, enc if op == "encode" else dec, heavy=provider != "reference")
    if op == "decode":
        assert np.array_equal(np.asarray(out).astype(np.int64), symbols)
    record(benchmark, "b", provider, op, n, k, len(data), ideal, **extra)


PROVIDERS_C = ["ours", "constriction", "constriction_pregrouped", "torchac", "reference"]
CASES_C = [(p, op) for p in PROVIDERS_C for op in ("encode", "decode")]


@pytest.mark.parametrize("provider,op", CASES_C)
def bench_c_indexed(benchmark, provider, op):
    benchmark.group = f"(c) 64 static tables K=256 {op}"
    peer = provider.split("_")[0]
    if peer in HAVE and not HAVE[peer]:
        pytest.skip(f"{peer} is not installed")
    table, indexes, symbols, ideal = case_c(N_C)
    n = REF_N if provider == "reference" else N_C
    indexes, symbols = indexes[:n], symbols[:n]
    if n != N_C:
        pdf = np.diff(table.astype(np.float64), axis=1) / 2**16
        ideal = -np.log2(pdf[indexes, symbols]).sum()
    extra = {}
    expected = symbols
    if provider.startswith("constriction"):
        import constriction

        tables = table.shape[0]
        models = [
            constriction.stream.model.Categorical(
                np.diff(table[t]).astype(np.float64) / 2**16, perfect=False
            )
            for t in range(tables)
        ]
        ix8 = indexes.astype(np.uint8)  # 64 tables: a uint8 key sorts by radix sort

        def grouping():
            """Symbol order grouped by table (stable) and the group boundaries."""
            order = np.argsort(ix8, kind="stable")
            return order, np.searchsorted(ix8[order], np.arange(tables + 1))

        pre_order, pre_bounds = grouping()
        pre_groups = [
            symbols[pre_order[pre_bounds[t] : pre_bounds[t + 1]]].astype(np.int32)
            for t in range(tables)
        ]
        pregrouped = provider == "constriction_pregrouped"
        extra["note_inputs"] = "one fixed model per table; symbols grouped by table " + (
            "outside the timed region (output left grouped)"
            if pregrouped
            else "inside the timed region (argsort, gather; scatter back on decode)"
        )

        def enc():
            if pregrouped:
                groups = pre_groups
            else:
                order, bounds = grouping()
                grouped = symbols[order].astype(np.int32)
                groups = [grouped[bounds[t] : bounds[t + 1]] for t in range(tables)]
            c = constriction.stream.stack.AnsCoder()
            for t in reversed(range(tables)):  # a stack: the first group is decoded first
                c.encode_reverse(groups[t], models[t])
            return c.get_compressed()

        comp = enc()
        data = comp.tobytes()

        def dec():
            c = constriction.stream.stack.AnsCoder(comp)
            if pregrouped:
                return np.concatenate(
                    [c.decode(models[t], len(g)) for t, g in enumerate(pre_groups)]
                )
            order, bounds = grouping()
            out = np.empty(len(order), np.int32)
            for t in range(tables):
                out[order[bounds[t] : bounds[t + 1]]] = c.decode(
                    models[t], bounds[t + 1] - bounds[t]
                )
            return out

        if pregrouped:
            expected = symbols[pre_order]
    elif provider == "torchac":
        import torch
        import torchac
        from torchac.torchac import _convert_to_int_and_normalize

        t16 = _convert_to_int_and_normalize(torch.from_numpy(table / 2**16).float(), True)
        ix = torch.from_numpy(indexes)
        sym16 = torch.from_numpy(symbols).short()
        extra["note_inputs"] = (
            "per-symbol int16 CDFs gathered from the tables inside the timed region"
        )

        def enc():
            return torchac.encode_int16_normalized_cdf(t16[ix], sym16)

        data = enc()

        def dec():
            return torchac.decode_int16_normalized_cdf(t16[ix], data)
    else:
        codec = ref if provider == "reference" else coding

        def enc():
            e = codec.RansEncoder(16)
            e.encode_indexed(symbols, indexes, table)
            return e.finish()

        data = enc()

        def dec():
            d = codec.RansDecoder(data, 16)
            out = d.decode_indexed(indexes, table)
            d.finish()
            return out

    out = run(benchmark, enc if op == "encode" else dec, heavy=provider != "reference")
    if op == "decode":
        assert np.array_equal(np.asarray(out).astype(np.int64), expected)
    record(benchmark, "c", provider, op, n, 256, len(data), ideal, tables=64, **extra)


FRAMING_N = [1, 10, 100, 1000, 1 << 16, 1 << 20]


@functools.lru_cache(maxsize=1)
def framing_tables(tables: int = 64, k: int = 256) -> np.ndarray:
    """64 softmax rows of Gaussian logits (std 2, ~5.5 bits/symbol) quantised at P = 24."""
    rng = np.random.default_rng(3)
    lg = rng.normal(size=(tables, k)) * 2.0
    return coding.quantize_probs(np.exp(lg - lg.max(axis=1, keepdims=True)).astype(np.float32))


@pytest.mark.parametrize("n", FRAMING_N)
@pytest.mark.parametrize("framing", ["standard", "compact"])
def bench_d_framing(benchmark, framing, n):
    """Many independent streams of n symbols drawn from random rows of framing_tables();
    ``fixed_bytes_mean`` / ``_max`` = stream bytes - ideal / 8 with the ideal
    -sum log2(f / 2^P) of the coded frequencies (quantisation loss excluded; ``overhead_pct``
    here is against that ideal too). From 65,536 symbols (4 lanes) the compact framing writes
    the standard stream."""
    benchmark.group = f"(d) framing, {n} symbols per stream"
    table = framing_tables()
    streams = max(1, 4000 // n) if n <= 1000 else 1
    rng = np.random.default_rng(n)
    cases = []
    freq = np.diff(table.astype(np.int64), axis=1)
    for _ in range(streams):
        ix = rng.integers(0, len(table), n)
        u = rng.random(n) * 2**24
        s = np.array([np.searchsorted(table[t], v, side="right") - 1 for t, v in zip(ix, u)])
        ideal = -np.log2(freq[ix, s] / 2**24).sum()
        cases.append((s, ix, ideal))

    def enc():
        out = []
        for s, ix, _ in cases:
            e = coding.RansEncoder(framing=framing)
            e.encode_indexed(s, ix, table)
            out.append(e.finish())
        return out

    datas = run(benchmark, enc)
    for (s, ix, _), data in zip(cases[:20], datas):  # the streams decode
        d = coding.RansDecoder(data, framing=framing, symbols=n)
        assert np.array_equal(d.decode_indexed(ix, table), s)
        d.finish()
    fixed = np.array([len(d) - ideal / 8 for (_, _, ideal), d in zip(cases, datas)])
    total_ideal = sum(c[2] for c in cases)
    record(
        benchmark,
        "d",
        f"ours_{framing}",
        "encode",
        n * streams,
        256,
        sum(len(d) for d in datas),
        total_ideal,
        framing=framing,
        symbols_per_stream=n,
        streams=streams,
        fixed_bytes_mean=float(fixed.mean()),
        fixed_bytes_max=float(fixed.max()),
    )


# ---- Markdown tables of bench/README.md from a saved JSON --------------------------------------

_LABELS = {
    "ours": "ours",
    "ours_mt": "ours, {threads} threads",
    "constriction": "constriction",
    "constriction_pregrouped": "constriction, pre-grouped",
    "torchac": "torchac",
    "reference": "reference",
}


def markdown_tables(results: dict) -> str:
    """The (a), (b), (c) tables of ``bench/README.md`` from a pytest-benchmark JSON of this file:
    millions of symbols per second, each column headed with the N its provider coded."""
    rows: dict = {}
    for b in results["benchmarks"]:
        e = b["extra_info"]
        rows[(e["scenario"], e["K"], e["op"], e["provider"])] = e

    def cell(key, bold=False):
        e = rows.get(key)
        if e is None:
            return "—"
        return f"**{e['msym_per_s']:.2f}**" if bold else f"{e['msym_per_s']:.2f}"

    def header(scenario, providers):
        """[(provider, column title)] and the N most columns coded (others name theirs)."""
        found = {}
        for p in providers:
            es = [e for (s, _, _, q), e in rows.items() if s == scenario and q == p]
            if es:
                found[p] = es[0]
        main_n = max((e["N"] for e in found.values()), default=0)
        cols = []
        for p, e in found.items():
            label = _LABELS[p].format(threads=e.get("threads", "N"))
            cols.append((p, label if e["N"] == main_n else f"{label} (N = {e['N']:,})"))
        return cols, main_n

    out = []
    for scenario, providers, ks in (
        ("a", PROVIDERS_A, (256, 1024)),
        ("b", PROVIDERS_B, (256, 1024)),
        ("c", PROVIDERS_C, (256,)),
    ):
        cols, main_n = header(scenario, providers)
        ratio = scenario == "a" and any(p == "constriction" for p, _ in cols)
        lead = [] if scenario == "c" else ["K"]
        head = [*lead, "op", *(h for _, h in cols)] + (["ours / constriction"] if ratio else [])
        out.append(f"**({scenario})** M symbols/s, N = {main_n:,} symbols per call:\n")
        out.append("| " + " | ".join(head) + " |")
        align = ["---:"] * len(lead) + ["---"] + ["---:"] * (len(head) - len(lead) - 1)
        out.append("|" + "|".join(align) + "|")
        for k in ks:
            for op in ("encode", "decode"):
                line = [*([str(k)] if lead else []), op]
                line += [cell((scenario, k, op, p), bold=p == "ours") for p, _ in cols]
                if ratio:
                    ours, peer = (
                        rows.get(("a", k, op, "ours")),
                        rows.get(("a", k, op, "constriction")),
                    )
                    line.append(
                        f"**{ours['msym_per_s'] / peer['msym_per_s']:.1f}×**"
                        if ours and peer
                        else "—"
                    )
                out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/rans_cpu-amd-epyc-2core.json"
    with open(path) as f:
        print(markdown_tables(json.load(f)))
