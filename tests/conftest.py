pytest_plugins = ["tests.sls_fixtures"]
