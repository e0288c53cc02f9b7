"""The wire: SMTP and outbox mailers, DKIM signing, and the send-time rate limits.

It says what a server answered; what that means for a subscriber is decided above it.
"""
