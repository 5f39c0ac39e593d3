"""Patch SVDD (Yi & Yoon, ACCV 2020): network, patch sampling, training losses, scoring, released weights."""
