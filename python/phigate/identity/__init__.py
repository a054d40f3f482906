"""Who is calling: OIDC access tokens and static API keys."""
