"""Plumbing shared by server, shell, cluster launcher and bench: said once here."""
