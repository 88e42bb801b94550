"""Graph passes: capture, canonicalize, match, legality, cost model, rewrite.

Installed as ``flurka_rewrite.passes``; never imports the CLI.
"""
