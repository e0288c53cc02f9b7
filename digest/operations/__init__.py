"""Operations: what an operator or a scraper asks: status, Prometheus metrics, beat's heartbeat.

Reads the ledger and Redis; changes nothing.
"""
