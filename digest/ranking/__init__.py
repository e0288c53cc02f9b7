"""Ranking: trending score, text and dense relevance, reader profiles and marks, the reasons shown.

Values in, picks out: it knows no database and no ORM class.
"""
