"""One module per third-party library whose private attributes the package relies on; each
has a test that fails when the installed library changes them (tests/core/test_adapters.py)."""
