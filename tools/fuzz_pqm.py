"""Fuzz the ``.pqm`` decoder with mutations of real files (issue: entropy model v2).

    python tools/fuzz_pqm.py --mutations 100000 --model default --out results/fuzz_pqm.json

Files: the model compresses small crops of real photos (Kodak by default, ``--images``); every
mutation (bit flips, byte overwrites, truncations, insertions, deletions, duplicated spans,
splices of two files, header-field rewrites) is decoded with ``decompress_codes``. Outcomes:

- ``refused``: a ``ValueError`` (the expected answer for a damaged file), by message class;
- ``same``: decoded to the original codes (a mutation that changes nothing the decoder reads);
- ``valid_other_file``: decoded to other codes whose encoding is exactly the mutated bytes (a
  splice can produce a valid file of other codes: nothing to detect);
- ``silently_wrong``: decoded without error to other codes that do not encode to these bytes:
  must be 0;
- ``other_error``: any other exception (must be 0), ``memory``: MemoryError (reported);
- crashes and hangs: the fuzzing runs in a child process; a child that dies or stops reporting
  for ``--hang-seconds`` is counted and the run continues in a new child from the next
  mutation.

Deterministic for a given ``--seed``. Prints progress (tqdm) and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _files(model_name: str, images: list[str], crop: int, seed: int):
    """(bytes, codes) of the model's files of random crops of ``images``."""
    import numpy as np

    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import compress_image, load_model

    model = load_model(model_name)
    rng = np.random.default_rng(seed)
    out = []
    for path in images:
        img = read_image(path)
        for size in (crop, crop // 2 + 7, 16):
            y = int(rng.integers(0, img.shape[0] - size + 1))
            x = int(rng.integers(0, img.shape[1] - size + 1))
            data = compress_image(np.ascontiguousarray(img[y : y + size, x : x + size]), model)
            codes = model.decompress_codes(data)[0]
            out.append((data, codes))
    return model, out


def mutate(data: bytes, other: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of ``data`` (``other``: a second file for splices)."""
    b = bytearray(data)
    kind = rng.choice(
        ["flip", "flips", "byte", "truncate", "insert", "delete", "dup", "splice", "header"]
    )
    n = len(b)
    if kind == "flip" and n:
        i = rng.randrange(n * 8)
        b[i // 8] ^= 1 << (i % 8)
    elif kind == "flips" and n:
        for _ in range(rng.randint(2, 8)):
            i = rng.randrange(n * 8)
            b[i // 8] ^= 1 << (i % 8)
    elif kind == "byte" and n:
        b[rng.randrange(n)] = rng.randrange(256)
    elif kind == "truncate" and n:
        del b[rng.randrange(n) :]
    elif kind == "insert":
        i = rng.randrange(n + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == "delete" and n:
        i = rng.randrange(n)
        del b[i : i + rng.randint(1, 8)]
    elif kind == "dup" and n:
        i = rng.randrange(n)
        b[i:i] = b[i : i + rng.randint(1, 16)]
    elif kind == "splice" and n:
        i, j = rng.randrange(n), rng.randrange(max(1, len(other)))
        b = b[:i] + bytearray(other[j:])
    else:  # header: rewrite one of the first 12 bytes
        kind = "header"
        if n:
            b[rng.randrange(min(n, 12))] = rng.randrange(256)
    return kind, bytes(b)


def _classify(exc: BaseException) -> str:
    msg = str(exc)
    for key in (
        "bad magic",
        "format version",
        "truncated header",
        "out of range",
        "varint",
        "made by model",
        "stages; the model codes only",
        "claims a",
        "corrupt .pqm payload",
        "code check",
    ):
        if key in msg:
            return key
    return "other ValueError"


def _child(args, start: int, conn) -> None:
    """Fuzz from mutation ``start``; sends (index, outcome, kind, detail) per mutation."""
    import torch

    torch.set_num_threads(1)
    model, files = _files(args.model, args.images, args.crop, args.seed)
    for i in range(start, args.mutations):
        rng = random.Random(args.seed * 1_000_003 + i)
        data, codes = files[rng.randrange(len(files))]
        other = files[rng.randrange(len(files))][0]
        kind, bad = mutate(data, other, rng)
        try:
            got = model.decompress_codes(bad)[0]
        except ValueError as exc:
            conn.send((i, "refused", kind, _classify(exc)))
            continue
        except MemoryError as exc:
            conn.send((i, "memory", kind, str(exc)[:200]))
            continue
        except Exception as exc:  # noqa: BLE001 - counted, must be 0
            conn.send((i, "other_error", kind, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        same = got.shape == codes.shape and bool(torch.equal(got, codes))
        if same:
            conn.send((i, "same", kind, ""))
            continue
        # other codes: fine only if the bytes are exactly what the encoder writes for them (a
        # splice can make a valid file of other codes; no decoder can tell that apart)
        from pqmim_kernels.coding import pqm_format

        header, _ = pqm_format.unpack(bad)
        again = model.compress_codes(got[0], (header.height, header.width), header.stages_sent)
        outcome = "valid_other_file" if again == bad else "silently_wrong"
        conn.send((i, outcome, kind, bad.hex() if outcome == "silently_wrong" else ""))
    conn.send(None)


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mutations", type=int, default=100_000)
    p.add_argument("--model", default="default")
    p.add_argument("--images", nargs="*", default=None, help="default: 4 Kodak images")
    p.add_argument("--crop", type=int, default=96, help="largest crop side (pixels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=120.0)
    p.add_argument("--out", default=None, help="JSON summary file")
    args = p.parse_args(argv)
    if args.images is None:
        kodak = ROOT.parent / "shared" / "data" / "kodak"
        args.images = [str(kodak / f"kodim{i:02d}.png") for i in (1, 7, 15, 23)]
    outcomes, kinds, details = Counter(), Counter(), Counter()
    crashes, hangs, examples = 0, 0, []
    t0 = time.time()
    i = 0
    bar = tqdm(total=args.mutations, desc="fuzz .pqm")
    ctx = mp.get_context("spawn")
    while i < args.mutations:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(args, i, child), daemon=True)
        proc.start()
        child.close()
        while True:
            if not parent.poll(args.hang_seconds if i > 0 else 10 * args.hang_seconds):
                hangs += 1
                proc.kill()
                i += 1
                bar.update(1)
                break
            try:
                msg = parent.recv()
            except EOFError:  # the child died
                crashes += 1
                examples.append({"index": i, "outcome": "crash"})
                i += 1
                bar.update(1)
                break
            if msg is None:
                break
            idx, outcome, kind, detail = msg
            outcomes[outcome] += 1
            kinds[(outcome, kind)] += 1
            if outcome == "refused":
                details[detail] += 1
            elif outcome != "same" and len(examples) < 20:
                examples.append({"index": idx, "outcome": outcome, "kind": kind, "detail": detail})
            i = idx + 1
            bar.update(1)
        proc.join(timeout=5)
    bar.close()
    summary = {
        "mutations": args.mutations,
        "seconds": round(time.time() - t0, 1),
        "model": args.model,
        "images": args.images,
        "seed": args.seed,
        "outcomes": dict(outcomes),
        "crashes": crashes,
        "hangs": hangs,
        "refusals_by_message": dict(details),
        "by_mutation": {f"{o}/{k}": v for (o, k), v in sorted(kinds.items())},
        "examples": examples,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = outcomes["silently_wrong"] + outcomes["other_error"] + crashes + hangs
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
