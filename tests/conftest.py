import signal

pytest_plugins = ["tests.sls_fixtures"]

# A test run started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored in every child it starts: the Ctrl-C tests (the CLI's
# KeyboardInterrupt, the benchmarks' restore on SIGINT) need it delivered. A handler is reset to the
# default in children at exec, so this also gives them back their own Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
