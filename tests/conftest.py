"""Suite configuration: which tests are ``slow``.

``pytest`` runs the fast suite (``addopts = -m "not slow"`` in pyproject.toml); ``pytest -m
slow`` runs the rest, and CI (``.ci/run``) runs both. Slow tests are marked here by file, fixture
or name rather than in each file, so one list says what the default run leaves out:

- the Triton kernels under the CPU interpreter and their ahead-of-time compiles;
- ``torch.compile`` graph tests, multi-process (DDP, ``torchrun``) runs and end-to-end
  subprocess runs of ``pqmim`` that each take several seconds on 2 CPU cores;
- a test can also carry ``@pytest.mark.slow`` itself.

Under ``TRITON_INTERPRET=1`` the Triton test files are the point of the run (that is how
``test_masked_attention.py`` runs ``test_masked_attention_triton.py`` in a subprocess), so they
are not marked then.
"""

from __future__ import annotations

import os

import pytest

# every test of these files
_SLOW_FILES = {"test_masked_attention_triton.py", "test_masked_attention_compile.py"}
_INTERPRETED_FILES = {"test_masked_attention_triton.py"}
# tests that use these fixtures (the pq_assign interpreter subprocess)
_SLOW_FIXTURES = {"triton_results"}
# file -> test function names
_SLOW_TESTS = {
    "test_masked_attention.py": {
        "test_triton_kernels_under_interpreter",  # runs test_masked_attention_triton.py
        "test_torch_compile_fullgraph_forward_and_backward",
    },
    "test_pq_assign.py": {
        "test_torch_compile_fullgraph_has_no_graph_break",
    },
    "test_attention_block.py": {"test_block_compiles_fullgraph"},
    "test_train.py": {"test_torchrun_two_process_gloo_smoke"},
    "test_product_quantizer.py": {"test_ddp_gloo_two_processes_keep_identical_codebooks"},
    "test_cli_codec.py": {"test_compress_decompress_subprocess"},
    "test_codec_default.py": {"test_cli_on_bundled_sample"},
    "test_rans.py": {"test_roundtrip_property"},
    "test_eval.py": {"test_cli_merge_adds_real_pqmim_stage_sweep", "test_evaluate_with_fake_pqmim"},
}


def is_slow(file_name: str, test_name: str, fixtures, interpreting: bool) -> bool:
    """Whether the test ``test_name`` (function name, no parameters) of ``file_name`` is slow."""
    if file_name in _SLOW_FILES and not (interpreting and file_name in _INTERPRETED_FILES):
        return True
    if _SLOW_FIXTURES.intersection(fixtures):
        return True
    return test_name in _SLOW_TESTS.get(file_name, ())


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        if is_slow(item.path.name, name, getattr(item, "fixturenames", ()), interpreting):
            item.add_marker(pytest.mark.slow)
