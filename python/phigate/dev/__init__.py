"""Tools for trying and testing phigate, never needed to serve: the demo, a synthetic EHR,
embedded PostgreSQL, development certificates and tokens."""
