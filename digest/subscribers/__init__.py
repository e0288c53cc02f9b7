"""Subscribers: the state machine, consent rules, imports, feedback marks, transactional mail.

Only subscriptions changes a subscriber's status; consent says which moves are allowed.
"""
