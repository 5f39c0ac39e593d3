"""The command line: patchsvdd synth | train | evaluate | export | predict | serve | import-weights | certs and the
demo."""
