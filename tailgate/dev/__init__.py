"""Development tools: the mock upstream, a fault-injecting TCP proxy, and the process kit (child
processes, a real ``redis-server`` on a free port) that ``tailgate dev``, the tests, the benchmark and
the soak share. The gateway and the worker never import this package."""
