"""Model layer (DESIGN §4.1)."""
from raekern.models import fusion  # noqa: F401
