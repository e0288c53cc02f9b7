"""Subscribers: the state machine, consent rules, imports, feedback marks, transactional mail,
and what planning and sending read of a subscriber (recipients).

Only subscriptions changes a subscriber's status; consent says which moves are allowed.
"""
