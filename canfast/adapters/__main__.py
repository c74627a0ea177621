"""``python -m canfast.adapters``: print the README's table of supported families."""

from canfast.adapters.table import families_table

print(families_table())
