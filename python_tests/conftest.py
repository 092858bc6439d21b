"""pytest configuration shared by python_tests/."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds (torch.compile, subprocesses); "
                                       "deselect with -m 'not slow'")
