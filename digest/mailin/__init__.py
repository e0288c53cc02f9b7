"""Mail in: classifying what a message to the list means, the SMTP listener and the IMAP poller.

Acts only on what a message proves (signed tokens, trusted relays), never on a From: header.
"""
