"""Scoring results: metrics, AUROC pooled over sites, category evaluation, tables, reports and plots."""
