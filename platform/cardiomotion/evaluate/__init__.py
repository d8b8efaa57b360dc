"""Metrics, figures and reports."""
