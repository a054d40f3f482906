"""Statement policy: the analyzer (analyze.py) turns SQL into fact sheets, the rules (rules.py)
judge them against a RoleSet, and engine.py answers the data plane's "decide" requests.

Import the submodules directly (``from phigate.policy.analyze import analyze``); this package
imports nothing itself, so that phigate.config can use phigate.policy.functions.
"""
