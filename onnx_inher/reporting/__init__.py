"""Presentation: terminal tables, Markdown reports, plots, bench renderings, the run result schema.

Nothing here measures or decides; it renders what the layers below computed.
"""
