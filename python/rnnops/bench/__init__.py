"""``python -m rnnops bench``: time every op and backend (and peers) on standard cases.

:mod:`.cases` defines the cases, :mod:`.timing` measures, :mod:`.cli` runs them and prints the
table (and writes ``results.json`` with ``--out``).
"""
