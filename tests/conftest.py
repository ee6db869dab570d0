"""Fixtures shared by the test packages: the models prepared by the set-up.

``TRITON_INTERPRET=1`` is set here, before any test module imports anything: Triton decides
interpreted-or-compiled when a function is decorated, and ``triton.language``'s own helpers
(``tl.max``...) are decorated when Triton is first imported — which vLLM does early. A test
fixture setting it later leaves those helpers compiled, and the interpreter then refuses them
("Cannot call @triton.jit'd outside of the scope of a kernel"). No GPU test runs here, and the
CPU engine runs no Triton kernel, so interpreting everything costs nothing else.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_kvstream.models import build_tiny_llama

    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvstream.models import prepare_smollm2

    return str(prepare_smollm2())
