"""The one request pipeline, a module per step; ``proxy.Proxy`` runs them in order."""
