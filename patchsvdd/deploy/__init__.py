"""Inspection at a site: bundles, thresholds, the inspector and the REST service."""
