"""PHI masking: classification from the catalog, the rewrite, plain reads and the data
plane's masking state."""
