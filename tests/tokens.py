"""The tokens the security, features and admin tests authenticate with, and the auth file that names them (the
``auth_file`` fixture of conftest writes it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

ADMIN = "admin-secret-0123456789"
ORDERS = "orders-secret-0123456789"
READER = "reader-secret-0123456789"

#: ops may do everything; orders publishes to orders and orders.*, consumes orders.* (its secret is given as a
#: digest); reader consumes orders.eu only.
AUTH = f"""
[tokens.ops]
secret = "{ADMIN}"
publish = ["*"]
consume = ["*"]
admin = true

[tokens.orders]
secret_sha256 = "{hashlib.sha256(ORDERS.encode()).hexdigest()}"
publish = ["orders", "orders.*"]
consume = ["orders.*"]

[tokens.reader]
secret = "{READER}"
consume = ["orders.eu"]
"""


def write(path: Path, text: str) -> None:
    """(A plain function: async tests may not call blocking Path methods directly.)"""
    path.write_text(text)
