"""Fake sensors that speak the real protocols, and whole simulated vans."""
