"""Worker of tests/test_cross_machine.py, run in a fresh process with its own environment:

    python cross_machine_worker.py encode MODEL OUT_DIR IMAGE...   # OUT_DIR/<i>.pqm, <i>.npy
    python cross_machine_worker.py decode MODEL OUT_DIR COUNT      # OUT_DIR/<i>.decoded.npy

``--threads N`` (first argument) sets torch.set_num_threads. Prints one JSON line describing
what this process computes with (torch's CPU capability, threads, integer backend).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv):
    if argv[0] == "--threads":
        torch.set_num_threads(int(argv[1]))
        argv = argv[2:]
    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.coding import int_kernels
    from pqmim_kernels.models import compress_image, load_model

    cmd, model_path, out = argv[0], argv[1], Path(argv[2])
    model = load_model(model_path)
    print(
        json.dumps(
            {
                "capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "int_backend": "cpp" if int_kernels.available() else "reference",
            }
        )
    )
    if cmd == "encode":
        for i, path in enumerate(argv[3:]):
            data = compress_image(read_image(path), model)
            (out / f"{i}.pqm").write_bytes(data)
            codes, _ = model.decompress_codes(data)  # the encoder's own codes
            np.save(out / f"{i}.npy", codes[0].numpy().astype(np.uint16))
    elif cmd == "decode":
        for i in range(int(argv[3])):
            codes, _ = model.decompress_codes((out / f"{i}.pqm").read_bytes())
            np.save(out / f"{i}.decoded.npy", codes[0].numpy().astype(np.uint16))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
