"""The provider sandbox: a real HTTP server simulating Neonomics and Sumsub (docs/sandbox.md).

Run it with `python -m sandbox` (Procfile entry `sandbox`); point NEONOMICS_API_URL and
SUMSUB_API_URL at it. Tests use the `sandbox` fixture from tests/conftest_sandbox.py.
"""
