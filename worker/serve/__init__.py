"""Servers and the command line."""
