"""Shared by the test files: the markers (pytest -m floor runs the tests that touch the libraries'
APIs, as .ci/run does under the oldest versions requirements.txt allows)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "floor: touches transformers, peft, accelerate or tantivy; .ci/run runs "
                                       "these under the oldest versions requirements.txt allows too")
