"""phigate: an on-prem gateway between AI agents and PostgreSQL for places holding PHI."""

__version__ = "0.1.0"
