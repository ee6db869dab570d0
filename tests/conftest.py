"""Fixtures shared by the test packages: the models prepared by the set-up."""

import pytest


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_kvstream.models import build_tiny_llama

    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvstream.models import prepare_smollm2

    return str(prepare_smollm2())
