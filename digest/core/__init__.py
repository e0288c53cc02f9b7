"""The ground every stage stands on: settings, errors, the schema and sessions, safe text.

It imports nothing above it; settings is read only by entry points, which pass values down.
"""
