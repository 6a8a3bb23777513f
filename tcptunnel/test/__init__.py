"""Tests for tcptunnel (run with ``trial tcptunnel``)."""
