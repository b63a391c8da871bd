pytest_plugins = ["tests.fixtures.services", "tests.fixtures.engine", "tests.fixtures.stacks"]
