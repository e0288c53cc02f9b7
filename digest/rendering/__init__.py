"""Rendering: Jinja2 email templates to subject, text, HTML and MIME; every link and its token.

Knows nothing of sending; tokens is the one place a signed token is made or read.
"""
