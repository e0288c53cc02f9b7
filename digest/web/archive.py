"""Placeholder until the digest archive and feed land here (another engineer owns this file)."""

from fastapi import APIRouter

router = APIRouter()
