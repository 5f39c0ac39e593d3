"""What only the tests, the benchmarks and the project's scripts use, kept out of the installed package: test
hosts in network namespaces (``testbed``, ``testbed_federation``), a delaying TCP relay (``delay``), the
notebook's side as a script for a test host (``headless``), headless Chromium (``browser``). Tests import it as
``support`` (pytest puts ``tests/`` on the path); benchmarks and scripts put ``tests/`` on ``sys.path`` first."""
